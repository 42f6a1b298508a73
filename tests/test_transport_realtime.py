"""Session events as data-channel messages: names after the OpenAI Realtime API where one fits, ours
otherwise, every event type mapped (a new event type cannot be dropped silently), JSON-ready."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from duplex import events as ev
from duplex.transport.realtime import RealtimeEncoder

W = (ev.Word("you", 0, 4800), ev.Word("said", 4800, 9600))

SAMPLES: list[ev.Event] = [
    ev.AudioIn(stream_samples=320, wall=1.0, samples=320),
    ev.VoiceEdge(stream_samples=6112, wall=1.45, at=5600, voiced=True),
    ev.SpeechStarted(stream_samples=8000, wall=1.5, start=5600),
    ev.TranscriptPartial(stream_samples=9000, wall=1.6, stable="ask not", unstable="what"),
    ev.SpeechStopped(stream_samples=30000, wall=2.9, start=5600, end=28000),
    ev.TranscriptFinal(stream_samples=30000, wall=3.0, text="ask not what", eou=True),
    ev.EndOfTurnEstimate(stream_samples=30000, wall=3.0, probability=0.87654),
    ev.TurnEnded(stream_samples=34400, wall=3.3, turn=0, text="ask not what", speech_end=28000),
    ev.AgentState(stream_samples=34400, wall=3.3, state="thinking"),
    ev.ReplyStarted(stream_samples=34400, wall=3.3, reply_id=1, turn=0),
    ev.ReplyText(stream_samples=34400, wall=3.4, reply_id=1, delta="You"),
    ev.ToolCalled(stream_samples=34400, wall=3.4, reply_id=1, call_id="call_1", name="weather",
                  arguments='{"city": "Paris"}'),
    ev.ToolResult(stream_samples=34400, wall=3.45, reply_id=1, call_id="call_1", name="weather",
                  output='{"sky": "clear"}', seconds=0.05),
    ev.ReplyAudio(stream_samples=34400, wall=3.5, reply_id=1, offset=0, samples=9600, words=W),
    ev.AudioOut(stream_samples=35000, wall=3.6, reply_id=1),
    ev.PlaybackProgress(stream_samples=38000, wall=3.8, reply_id=1, played=4800),
    ev.BargeIn(stream_samples=40000, wall=4.0, reply_id=1, speech_start=39000),
    ev.Resumed(stream_samples=41000, wall=4.1, reply_id=1),
    ev.Interrupted(stream_samples=42000, wall=4.2, reply_id=1, heard="You", played=7200),
    ev.ReplyDone(stream_samples=42000, wall=4.2, reply_id=1, text="You said", heard="You", interrupted=True),
    ev.Metric(stream_samples=35000, wall=3.6, name="voice_to_voice_s", value=0.61, reply_id=1),
    ev.Error(stream_samples=42000, wall=4.3, stage="asr", message="boom", fatal=False),
]


def _event_classes() -> set[type]:
    return {obj for obj in vars(ev).values()
            if isinstance(obj, type) and issubclass(obj, ev.Event) and obj is not ev.Event}


def test_every_event_type_is_mapped_or_deliberately_skipped():
    """Each event class of duplex.events has a sample here and becomes a message, except AudioIn
    (one per 20 ms packet) and VoiceEdge (the VAD's window-by-window flicker, several a second in
    speech; speech_started/stopped carry what a client needs), deliberately not sent."""
    assert {type(e) for e in SAMPLES} == _event_classes()
    enc = RealtimeEncoder(t0=1.0, output_rate=24_000)
    skipped = [type(e) for e in SAMPLES if enc.encode(e) is None]
    assert skipped == [ev.AudioIn, ev.VoiceEdge]


def test_messages_use_realtime_names_and_carry_times():
    """The Realtime API names and main fields where one fits; event ids are unique; stream and
    server times come along; everything round-trips through JSON."""
    enc = RealtimeEncoder(t0=1.0, output_rate=24_000)
    out = [m for m in (enc.encode(e) for e in SAMPLES) if m is not None]
    by_type = {m["type"]: m for m in out}
    assert by_type["input_audio_buffer.speech_started"]["audio_start_ms"] == 350
    assert by_type["input_audio_buffer.speech_stopped"]["audio_end_ms"] == 1750
    delta = by_type["conversation.item.input_audio_transcription.delta"]
    assert (delta["text"], delta["stable"], delta["unstable"]) == ("ask not what", "ask not", "what")
    done = by_type["conversation.item.input_audio_transcription.completed"]
    assert done["transcript"] == "ask not what" and done["item_id"] == delta["item_id"] == "item_user_1"
    assert by_type["input_audio_buffer.committed"]["transcript"] == "ask not what"
    assert by_type["response.created"]["response_id"] == "resp_1"
    assert by_type["response.audio_transcript.delta"]["delta"] == "You"
    assert by_type["response.audio.words"]["words"][1] == {"text": "said", "start": 4800, "end": 9600}
    assert by_type["response.audio.progress"]["played_s"] == 0.2
    assert by_type["output_audio_buffer.started"]["response_id"] == "resp_1"
    assert by_type["agent.interrupted"]["heard"] == "You" and by_type["agent.interrupted"]["played_s"] == 0.3
    assert by_type["response.done"]["status"] == "cancelled" and by_type["response.done"]["heard"] == "You"
    assert by_type["agent.metric"] == {**by_type["agent.metric"], "name": "voice_to_voice_s", "value": 0.61}
    assert by_type["error"]["error"]["message"] == "boom"
    assert by_type["response.function_call_arguments.done"]["arguments"] == '{"city": "Paris"}'
    assert by_type["conversation.item.created"]["item"] == {
        "id": "item_call_1_output", "type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear"}'}
    assert by_type["agent.state"]["state"] == "thinking"
    assert len({m["event_id"] for m in out}) == len(out)
    assert by_type["input_audio_buffer.speech_started"]["t"] == 0.5
    assert by_type["input_audio_buffer.speech_started"]["stream_s"] == 0.5
    assert json.loads(json.dumps(out)) == out


def test_state_names_match_the_page():
    """The agent states the page styles are the states the session reports."""
    assert set(typing.get_args(ev.AgentStateName)) == {"listening", "thinking", "speaking"}
    css = (Path(__file__).parents[1] / "web" / "style.css").read_text()
    for state in ("listening", "thinking", "speaking", "paused"):
        assert f".state-{state}" in css
