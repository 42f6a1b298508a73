"""Session events as data-channel messages, named after the OpenAI Realtime API's server events.

Where a Realtime event fits, its name and main fields are used (``input_audio_buffer.speech_started``
with ``audio_start_ms``, ``conversation.item.input_audio_transcription.completed`` with
``transcript``, ``response.audio_transcript.delta``, ``response.done``, ``error``...); what the
Realtime API has no event for gets a name of ours under ``agent.`` (state, barge-in, interruption,
latency) or ``response.audio.*`` (word timing and playback position of the reply audio).

Every message also carries ``event_id``, ``stream_s`` (the input stream time it depends on, seconds
since the session started) and ``t`` (server clock, seconds since the session started), so the page
can relate messages to each other. Per-turn latency comes as ``agent.metric`` messages (``name`` one of
``voice_to_voice_s``, its parts, or ``barge_in_s``) tagged with the ``response_id``. Our partial transcripts may revise their tail, so the ``delta``
of a transcription event carries the whole current hypothesis in ``text`` (``stable`` never changes,
``unstable`` may), not an increment.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Any

from duplex import events as ev

def _ms(samples: int) -> int:
    return int(round(1000 * samples / ev.INPUT_RATE))


class RealtimeEncoder:
    """Turns one session's events into data-channel messages (``None`` for events not sent)."""

    def __init__(self, t0: float, output_rate: int) -> None:
        self.t0 = t0
        self.output_rate = output_rate
        self._ids = itertools.count(1)
        self._utterance = 0  # counts user utterances, for item ids

    @property
    def user_item(self) -> str:
        """The item id of the user's current (or last) utterance."""
        return f"item_user_{self._utterance}"

    def _base(self, kind: str, event: ev.Event) -> dict[str, Any]:
        return {"type": kind, "event_id": f"evt_{next(self._ids)}", "stream_s": round(event.stream_s, 3),
                "t": round(event.wall - self.t0, 3)}

    def encode(self, event: ev.Event) -> dict[str, Any] | None:
        item = f"item_user_{self._utterance}"
        if isinstance(event, (ev.AudioIn, ev.VoiceEdge)):
            return None  # one per 20 ms packet / the VAD's window-by-window flicker: too chatty for the page
        if isinstance(event, ev.SpeechStarted):
            self._utterance += 1
            return {**self._base("input_audio_buffer.speech_started", event),
                    "item_id": f"item_user_{self._utterance}", "audio_start_ms": _ms(event.start)}
        if isinstance(event, ev.SpeechStopped):
            return {**self._base("input_audio_buffer.speech_stopped", event), "item_id": item,
                    "audio_end_ms": _ms(event.end)}
        if isinstance(event, ev.TranscriptPartial):
            return {**self._base("conversation.item.input_audio_transcription.delta", event), "item_id": item,
                    "text": event.text, "stable": event.stable, "unstable": event.unstable}
        if isinstance(event, ev.TranscriptFinal):
            return {**self._base("conversation.item.input_audio_transcription.completed", event),
                    "item_id": item, "transcript": event.text, "end_of_utterance": event.eou}
        if isinstance(event, ev.TurnEnded):
            return {**self._base("input_audio_buffer.committed", event), "item_id": item, "turn": event.turn,
                    "transcript": event.text, "audio_end_ms": _ms(event.speech_end)}
        if isinstance(event, ev.EndOfTurnEstimate):
            return {**self._base("agent.end_of_turn_estimate", event), "probability": round(event.probability, 3)}
        if isinstance(event, ev.AgentState):
            return {**self._base("agent.state", event), "state": event.state}
        if isinstance(event, ev.ReplyStarted):
            return {**self._base("response.created", event), "response_id": _rid(event.reply_id),
                    "turn": event.turn}
        if isinstance(event, ev.ReplyText):
            return {**self._base("response.audio_transcript.delta", event), "response_id": _rid(event.reply_id),
                    "delta": event.delta}
        if isinstance(event, ev.ToolCalled):
            return {**self._base("response.function_call_arguments.done", event), "response_id": _rid(event.reply_id),
                    "item_id": f"item_{event.call_id}", "call_id": event.call_id, "name": event.name,
                    "arguments": event.arguments}
        if isinstance(event, ev.ToolResult):
            return {**self._base("conversation.item.created", event), "response_id": _rid(event.reply_id),
                    "item": {"id": f"item_{event.call_id}_output", "type": "function_call_output",
                             "call_id": event.call_id, "output": event.output},
                    "name": event.name, "error": event.error, "seconds": round(event.seconds, 3),
                    "spoken": event.spoken}
        if isinstance(event, ev.ReplyAudio):
            return {**self._base("response.audio.words", event), "response_id": _rid(event.reply_id),
                    "offset": event.offset, "samples": event.samples, "sample_rate": self.output_rate,
                    "words": [asdict(w) for w in event.words]}
        if isinstance(event, ev.AudioOut):
            return {**self._base("output_audio_buffer.started", event), "response_id": _rid(event.reply_id)}
        if isinstance(event, ev.PlaybackProgress):
            return {**self._base("response.audio.progress", event), "response_id": _rid(event.reply_id),
                    "played": event.played, "played_s": round(event.played / self.output_rate, 3)}
        if isinstance(event, ev.BargeIn):
            return {**self._base("agent.barge_in", event), "response_id": _rid(event.reply_id),
                    "audio_start_ms": _ms(event.speech_start)}
        if isinstance(event, ev.Resumed):
            return {**self._base("agent.resumed", event), "response_id": _rid(event.reply_id)}
        if isinstance(event, ev.Interrupted):
            return {**self._base("agent.interrupted", event), "response_id": _rid(event.reply_id),
                    "heard": event.heard, "played_s": round(event.played / self.output_rate, 3)}
        if isinstance(event, ev.ReplyDone):
            return {**self._base("response.done", event), "response_id": _rid(event.reply_id),
                    "status": "cancelled" if event.interrupted else "completed",
                    "transcript": event.text, "heard": event.heard, "interrupted": event.interrupted}
        if isinstance(event, ev.Metric):
            return {**self._base("agent.metric", event), "name": event.name, "value": event.value,
                    "response_id": _rid(event.reply_id) if event.reply_id is not None else None}
        if isinstance(event, ev.Error):
            return {**self._base("error", event),
                    "error": {"type": "server_error" if event.fatal else "stage_error", "stage": event.stage,
                              "message": event.message, "fatal": event.fatal}}
        return None


def _rid(reply_id: int) -> str:
    return f"resp_{reply_id}"
