"""Speculative replies: made while the user pauses, committed when the turn ends, withdrawn without
a trace when the user goes on (real VAD on JFK's speech, fake ASR/LLM/TTS, virtual clock)."""

from __future__ import annotations

import numpy as np

from duplex import events as ev
from duplex.clock import run_virtual
from duplex.config import TurnConfig
from duplex.stages import Message
from tests.fake_agent import clip, drive, make_agent, silence


def test_a_withdrawn_speculation_leaves_no_trace(vad_model, jfk16):
    """The user pauses mid-sentence (0.8 s, shorter than max_silence_s): a reply to the first half is
    started at once, then withdrawn when they go on (guesses at shorter pauses inside the phrases may
    come and go too). Nothing of them was played or emitted, the record holds one user turn with all
    the words and one reply, and that reply was made from all of them (the fake LLM echoes the words)."""
    agent = make_agent(vad_model, asr={"utterances": ["i would like", "a table for two"]},
                       llm={"ttft_s": 0.05},
                       tts={"first_chunk_s": 0.02})
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(0.8), clip(jfk16, 3.25, 4.6), silence(3.0)])
    sessions = []

    async def main():
        sessions.append(agent.session())
        return await drive(agent, pcm, session=sessions[0])

    run = run_virtual(main())
    session, = sessions
    assert session.speaking.speculations["withdrawn"] >= 1 and session.speaking.speculations["committed"] == 1
    started, = run.of(ev.ReplyStarted)
    assert {e.reply_id for e in (*run.of(ev.ReplyText), *run.of(ev.ReplyAudio), *run.of(ev.AudioOut),
                                 *run.of(ev.ReplyDone))} == {started.reply_id}
    text = "".join(e.delta for e in run.of(ev.ReplyText))
    second_start = next(e for e in run.of(ev.SpeechStarted) if e.start > 3 * 16000)
    out, = run.of(ev.AudioOut)
    assert out.wall > run.of(ev.SpeechStopped)[-1].wall  # no agent audio before the user was done
    assert not any(np.abs(f).max() > 0 for t, f in zip(run.frame_walls, run.frames) if t < out.wall)
    turns = run.conversation["turns"]
    said = turns[0]["text"]
    assert [t["role"] for t in turns] == ["user", "assistant"] and turns[1]["text"] == text == f"You said: {said}."
    assert said.startswith("i would like a") and said == run.of(ev.TurnEnded)[0].text
    stream, = agent.stages.llm.streams
    assert stream.shown[-1] == [Message("user", said)]  # the reply heard all the words
    assert stream.replies >= 2  # the withdrawn guess was really generated
    assert second_start.start > 0


def test_confident_end_of_turn_answers_within_250_ms(vad_model, jfk16):
    """With a confident, correct end-of-turn estimate and instant stages, the speculative reply is
    ready when the turn ends after confident_silence_s: voice-to-voice at most 250 ms (virtual clock)."""
    agent = make_agent(vad_model, asr={"utterances": ["what time is it"]},
                       llm={"replies": ["noon"], "ttft_s": 0.0, "token_s": 0.0, "eot": 0.97},
                       tts={"first_chunk_s": 0.0})
    run = run_virtual(drive(agent, np.concatenate([clip(jfk16, 0.2, 2.4), silence(2.0)])))
    v2v, = [m.value for m in run.of(ev.Metric) if m.name == "voice_to_voice_s"]
    assert 0.0 < v2v <= 0.25, v2v


def test_without_speculation_the_same_turn_waits_for_the_reply(vad_model, jfk16):
    """Control: the same turn with speculation off waits for the LLM and TTS after the turn ends."""
    agent = make_agent(vad_model, asr={"utterances": ["what time is it"]},
                       llm={"replies": ["noon"], "ttft_s": 0.2, "eot": 0.97}, tts={"first_chunk_s": 0.1},
                       turn=TurnConfig(speculate=False))
    run = run_virtual(drive(agent, np.concatenate([clip(jfk16, 0.2, 2.4), silence(2.0)])))
    v2v, = [m.value for m in run.of(ev.Metric) if m.name == "voice_to_voice_s"]
    assert v2v > 0.25 + 0.2 + 0.1 - 0.05, v2v
