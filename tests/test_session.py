"""Orchestration of a session: real Silero VAD on real speech, scripted ASR/LLM/TTS, virtual clock.

Input audio is cut from JFK's speech; the fake stages have fixed delays, so every run is identical.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from duplex import events as ev
from duplex.clock import run_virtual
from duplex.errors import AudioFormatError
from duplex.playout import Playout
from duplex.stages import Message
from tests.fake_agent import clip, drive, make_agent, silence

REPLY = "one two three four five six seven eight nine ten"


def _frames_between(run, t_from: float, t_to: float) -> list[np.ndarray]:
    return [f for t, f in zip(run.frame_walls, run.frames) if t_from < t < t_to]


def test_barge_in_silences_and_keeps_only_heard_words(vad_model, jfk16):
    """Speech over the agent silences it within a frame; no audio of the interrupted reply is emitted
    afterwards; the record holds exactly the words played, and the LLM's next context only those."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there", "stop now please"]},
                       llm={"replies": [REPLY, "okay"]})
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(2.8), clip(jfk16, 5.3, 7.8), silence(4.0)])
    run = run_virtual(drive(agent, pcm))

    barge, = run.of(ev.BargeIn)
    interrupted, = run.of(ev.Interrupted)
    out1, out2 = run.of(ev.AudioOut)
    assert barge.reply_id == interrupted.reply_id == out1.reply_id == 1
    # Agent audio was flowing before the barge-in ...
    assert any(np.abs(f).max() > 0.05 for f in _frames_between(run, out1.wall, barge.wall))
    # ... and after it, nothing but silence until the next reply starts.
    after = _frames_between(run, barge.wall + 0.021, out2.wall)
    assert after and all(not f.any() for f in after)
    # No reply-1 audio queued after the interruption either.
    assert not [e for e in run.of(ev.ReplyAudio) if e.reply_id == 1 and e.wall > interrupted.wall]

    # Heard = the words whose middle was played, and nothing more.
    words = [w for e in run.of(ev.ReplyAudio) if e.reply_id == 1 for w in e.words]
    heard = [w.text for w in words if (w.start + w.end) / 2 <= interrupted.played]
    assert 0 < len(heard) < len(REPLY.split())
    assert interrupted.heard == " ".join(heard)
    played_frames = [f for f in _frames_between(run, out1.wall - 1e-9, barge.wall + 0.021) if f.any()]
    assert abs(len(played_frames) * 480 - interrupted.played) <= 480
    agent_turns = [t for t in run.conversation["turns"] if t["role"] == "assistant"]
    assert agent_turns[0]["heard"] == interrupted.heard and agent_turns[0]["interrupted"]

    # The interrupting words started the next turn, and the LLM saw only the heard words.
    user_turns = [t["text"] for t in run.conversation["turns"] if t["role"] == "user"]
    assert user_turns == ["hello there", "stop now please"]
    stream, = agent.stages.llm.streams
    assert stream.shown[-1] == [Message("user", "hello there"), Message("assistant", interrupted.heard),
                                Message("user", "stop now please")]
    latency, = [m.value for m in run.of(ev.Metric) if m.name == "barge_in_s"]
    assert 0 < latency < 0.25


def test_false_interruption_resumes(vad_model, jfk16):
    """A short sound with no words pauses the agent, then it resumes and finishes its reply."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there"], "word_s": 0.35},
                       llm={"replies": [REPLY]})
    cough = clip(jfk16, 0.33, 0.6)  # "And": too short for a word
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(2.8), cough, silence(5.0)])
    run = run_virtual(drive(agent, pcm))
    assert run.of(ev.BargeIn) and run.of(ev.Resumed)
    assert not run.of(ev.Interrupted)
    done, = run.of(ev.ReplyDone)
    assert not done.interrupted and done.heard == REPLY
    assert run.of(ev.Resumed)[0].wall > run.of(ev.BargeIn)[0].wall


def test_backchannel_is_talked_over(vad_model, jfk16):
    """A word the LLM calls a backchannel resumes the agent and never becomes a user turn."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there", "yeah"]}, llm={"replies": [REPLY]})
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(2.8), clip(jfk16, 3.25, 3.9), silence(5.0)])
    run = run_virtual(drive(agent, pcm))
    assert run.of(ev.BargeIn) and run.of(ev.Resumed) and not run.of(ev.Interrupted)
    assert [t["text"] for t in run.conversation["turns"] if t["role"] == "user"] == ["hello there"]
    assert run.of(ev.ReplyDone)[0].heard == REPLY


def test_a_failing_backchannel_check_yields_and_the_session_goes_on(vad_model, jfk16):
    """Regression: when the backchannel check raises (out of memory, a closed stream), the barge-in
    counts as an interruption: the session reports the error, stops the reply, and the next turn
    ends and is answered (before, playback stayed paused and no turn could end again)."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there", "yeah", "thanks"]},
                       llm={"replies": [REPLY, "sure", "bye"]})

    async def broken(messages, text):
        raise RuntimeError("CUDA out of memory")

    agent.stages.llm.is_backchannel_override = broken
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(2.8), clip(jfk16, 3.25, 3.9), silence(3.0),
                          clip(jfk16, 8.0, 10.8), silence(4.0)])
    run = run_virtual(drive(agent, pcm))
    assert run.of(ev.BargeIn) and run.of(ev.Interrupted) and not run.of(ev.Resumed)
    assert any("backchannel check failed" in e.message for e in run.of(ev.Error))
    assert len(run.of(ev.TurnEnded)) == 3 and len(run.of(ev.AudioOut)) == 3
    assert [t["text"] for t in run.conversation["turns"] if t["role"] == "user"] == ["hello there", "yeah",
                                                                                      "thanks"]


def test_user_going_on_while_agent_thinks(vad_model, jfk16):
    """If the user speaks again before any reply audio, the reply is dropped unheard and the turn
    continues: one user turn with all the words, one reply."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there", "how are you"]},
                       llm={"ttft_s": 3.0, "replies": ["fine"]})  # still thinking, speculation or not
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(1.8), clip(jfk16, 5.3, 7.8), silence(4.0)])
    run = run_virtual(drive(agent, pcm))
    assert len(run.of(ev.TurnEnded)) == 2
    assert run.of(ev.ReplyDone)[0].heard == "" and run.of(ev.ReplyDone)[0].interrupted
    turns = run.conversation["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"]
    assert turns[0]["text"] == "hello there how are you" and turns[1]["heard"] == "fine"


def test_agent_answers_after_the_user_stops(vad_model, jfk16):
    """The reply's first audio comes after the user's speech ended, with the latency breakdown;
    without speculation the LLM's first token takes the fake's 0.2 s after the turn ends, with it
    the reply is ready when the turn ends and voice-to-voice is the end-of-turn wait and one frame."""
    from duplex.config import TurnConfig

    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(3.0)])
    figures = {}
    for speculate in (False, True):
        agent = make_agent(vad_model, asr={"utterances": ["hello there"]}, llm={"replies": ["hi"]},
                           turn=TurnConfig(speculate=speculate))
        run = run_virtual(drive(agent, pcm))
        stop, = run.of(ev.SpeechStopped)
        out, = run.of(ev.AudioOut)
        assert out.wall > stop.wall
        metrics = {m.name: m.value for m in run.of(ev.Metric)}
        parts = ("end_of_turn_s", "llm_first_token_s", "tts_first_audio_s", "playout_s")
        assert metrics["voice_to_voice_s"] == pytest.approx(sum(metrics[p] for p in parts), abs=1e-3)
        figures[speculate] = metrics
    assert figures[False]["llm_first_token_s"] == pytest.approx(0.2, abs=1e-6)  # the fake's ttft_s
    assert figures[True]["llm_first_token_s"] == figures[True]["tts_first_audio_s"] == 0.0
    assert figures[True]["playout_s"] <= 0.021 and figures[True]["speculative_lead_s"] > 0
    assert figures[True]["voice_to_voice_s"] < figures[False]["voice_to_voice_s"] - 0.25


def test_slow_asr_never_blocks_pacing_or_vad(vad_model, jfk16):
    """An ASR that takes 0.3 s per 20 ms packet falls behind, yet output frames keep their 20 ms pace
    and the VAD still reports speech on time (virtual clock: exact)."""
    agent = make_agent(vad_model, asr={"delay_s": 0.3})
    run = run_virtual(drive(agent, np.concatenate([clip(jfk16, 0.0, 2.4), silence(0.6)])))
    walls = np.array(run.frame_walls)
    assert np.allclose(np.diff(walls), 0.02, atol=1e-6)
    assert len(walls) >= int(3.0 / 0.02) - 1
    start, = [e for e in run.of(ev.SpeechStarted)][:1]
    assert start.wall < 0.6  # speech begins at 0.35 s; the ASR is seconds behind by then


def test_blocking_model_compute_does_not_stall_the_event_loop(vad_model, jfk16):
    """Real clock: ASR compute that blocks its worker thread 0.3 s per packet leaves the 20 ms frame
    clock running (no gap anywhere near the compute time)."""
    agent = make_agent(vad_model, asr={"compute_s": 0.3})

    async def main():
        session = agent.session()
        stamps: list[float] = []

        async def frames():
            async for _ in session.audio():
                stamps.append(time.perf_counter())

        task = asyncio.create_task(frames())
        for k in range(50):  # one second of audio
            session.push_audio(jfk16[k * 320:(k + 1) * 320], 16000)
            await asyncio.sleep(0.02)
        await session.close()
        await task
        return np.diff(stamps)

    gaps = asyncio.run(main())
    assert len(gaps) > 30
    # frames keep their 20 ms pace, and no gap reaches the 0.3 s compute (a loaded machine's odd
    # scheduling hiccup is allowed for, not a wait on the worker)
    assert np.percentile(gaps, 90) < 0.05 and gaps.max() < 0.25, np.round(gaps, 3)


def test_sessions_on_one_agent_do_not_share_state(vad_model, jfk16):
    """Two concurrent sessions (one talking, one silent) keep separate records, streams and turns,
    while their VAD windows are scored in shared batches."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there"]}, llm={"replies": ["hi"]})
    talk = np.concatenate([clip(jfk16, 0.2, 2.4), silence(3.0)])

    async def main():
        a, b = agent.session(), agent.session()
        return await asyncio.gather(drive(agent, talk, session=a), drive(agent, silence(len(talk) / 16000), session=b))

    batches_before = vad_model.worker.ticks
    ra, rb = run_virtual(main())
    assert [t["role"] for t in ra.conversation["turns"]] == ["user", "assistant"]
    assert rb.conversation["turns"] == [] and not rb.of(ev.SpeechStarted) and not rb.of(ev.ReplyStarted)
    sa, sb = agent.stages.llm.streams
    assert sa.shown and not sb.shown
    assert max(vad_model.worker.batch_sizes(batches_before)) == 2
    assert not agent.sessions


def test_bad_input_is_refused_or_converted(vad_model, jfk16):
    """Wrong rates and empty blocks are refused with clear errors; int16 stereo at 48 kHz and NaN
    input are converted and the session goes on hearing the speech."""
    agent = make_agent(vad_model)

    async def main():
        session = agent.session()
        with pytest.raises(AudioFormatError, match="sample rate 1000 Hz"):
            session.push_audio(np.zeros(100, np.float32), 1000)
        with pytest.raises(AudioFormatError, match="empty"):
            session.push_audio(np.zeros(0, np.int16), 16000)
        session.push_audio(np.full(960, np.nan, np.float32), 48000)  # NaN: treated as silence
        await session.close()
        with pytest.raises(RuntimeError, match="closed"):
            session.push_audio(np.zeros(10, np.float32), 16000)

    run_virtual(main())

    from duplex.audio import resample
    speech = np.concatenate([clip(jfk16, 0.2, 2.4), silence(1.0)])
    stereo48 = np.repeat((resample(speech, 16000, 48000) * 32767).astype(np.int16)[:, None], 2, axis=1)
    a = run_virtual(drive(agent, speech))
    b = run_virtual(drive(agent, stereo48, rate=48000))
    starts_a = [e.start / 16000 for e in a.of(ev.SpeechStarted)]
    starts_b = [e.start / 16000 for e in b.of(ev.SpeechStarted)]
    assert len(starts_a) == len(starts_b) >= 1
    assert np.allclose(starts_a, starts_b, atol=0.07)


def test_playout_refuses_audio_of_a_cancelled_reply():
    """Once a new reply starts (or the buffer is dropped), audio of the old reply is refused."""
    async def main():
        p = Playout(24000)
        p.start_reply(1)
        assert await p.put(1, np.ones(960, np.float32))
        p.start_reply(2)
        assert not await p.put(1, np.ones(960, np.float32))
        assert await p.put(2, np.full(480, 0.5, np.float32))
        p.end_reply(2)
        frame = p.next_frame()
        assert frame.reply_id == 2 and np.all(frame.pcm == 0.5) and frame.finished
        p.drop()
        assert p.next_frame().reply_id is None

    run_virtual(main())


def test_a_failing_stage_ends_only_its_session_and_keeps_the_record(vad_model, jfk16):
    """An ASR crash is reported as a fatal Error event and closes that session; what was said before
    stays in its record, and another session on the same agent carries on."""
    failing = make_agent(vad_model, asr={"utterances": ["hello there"], "fail_at_s": 5.0},
                         llm={"replies": ["hi"]})
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(4.0)])

    async def main():
        healthy = make_agent(vad_model, asr={"utterances": ["hello there"]}, llm={"replies": ["hi"]})
        return await asyncio.gather(drive(failing, pcm), drive(healthy, pcm))

    bad, good = run_virtual(main())
    errors = bad.of(ev.Error)
    assert errors and errors[0].fatal and errors[0].stage == "asr" and "scripted" in errors[0].message
    assert [t["role"] for t in bad.conversation["turns"]][:1] == ["user"]
    assert bad.conversation["turns"][0]["text"] == "hello there"
    assert not good.of(ev.Error) and [t["role"] for t in good.conversation["turns"]] == ["user", "assistant"]


def test_an_overload_is_reported_once_not_per_block(vad_model):
    """Models that fall more than 10 s behind make the session drop input: one error when the
    overload starts and one when it ends, saying how much was dropped (not 50 events a second)."""
    agent = make_agent(vad_model, asr={"rtf": 4.0})  # 4 s to hear each second: it falls 10 s behind

    async def main():
        session = agent.session()
        errors = session.events()
        block = np.zeros(320, np.float32)
        for _ in range(int(15 / 0.02)):  # 15 s of input: the last few seconds of it dropped
            session.push_audio(block, 16_000)
            await asyncio.sleep(0.02)
        await asyncio.sleep(400)  # the ASR works through its backlog
        session.push_audio(block, 16_000)
        await asyncio.sleep(0.1)
        dropped = session.intake.dropped_input_s
        await session.close()
        return [e async for e in errors if isinstance(e, ev.Error) and e.stage == "input"], dropped

    found, dropped = run_virtual(main())
    assert len(found) == 2, [e.message for e in found]
    assert "dropping input until they catch up" in found[0].message
    assert "dropped" in found[1].message and 2.0 < dropped < 5.0


def test_closing_during_a_reply_ends_its_task_and_keeps_its_record(vad_model, jfk16):
    """Closing a session (the page hung up) while a long reply is being spoken ends that reply's task
    too (with real engines it holds a TTS slot other sessions need), and the record closed at the
    playback position stays as it was: no text is added to it afterwards."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there"]}, llm={"replies": [" ".join(["word"] * 300)]})

    async def main():
        session = agent.session()
        events = session.events()
        pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(4.0)])
        for i in range(0, pcm.size, 320):
            session.push_audio(pcm[i:i + 320], 16_000)
            await asyncio.sleep(0.02)
        assert session.state == "speaking"
        await session.close()
        left = [t.get_name() for t in asyncio.all_tasks() if "-reply-" in t.get_name() and not t.done()]
        reply = session.conversation.turns[-1]
        text = reply.text
        await asyncio.sleep(5.0)
        seen = [e async for e in events]
        return left, reply, text, seen

    left, reply, text, seen = run_virtual(main())
    assert left == [], left
    assert reply.role == "assistant" and reply.interrupted and reply.text == text
    done = [e for e in seen if isinstance(e, ev.ReplyDone)]
    assert done and all(not isinstance(e, ev.ReplyText) for e in seen[seen.index(done[-1]):])


def test_a_close_cut_short_is_finished_by_the_next(vad_model):
    """A close whose caller is cancelled half-way still finishes (streams closed, subscribers ended,
    the agent forgets the session), and a second close waits for that one instead of returning at
    once while the session is still shutting down."""
    agent = make_agent(vad_model)

    async def main():
        session = agent.session()
        events = session.events()
        first = asyncio.create_task(session.close())
        await asyncio.sleep(0)
        first.cancel()
        await session.close()
        return [e async for e in events], session in agent.sessions, first.cancelled()

    seen, still_known, cancelled = run_virtual(main())
    assert not still_known and cancelled  # the subscription ended: the iteration above returned


def test_pause_fades_out_and_resume_goes_on_from_the_same_sample():
    """A pause does not stop mid-wave: the next frame fades the coming audio out over 10 ms and
    counts none of it as played; the resume fades in from that same sample. Frames given back with
    rewind (a live output's unread queue at a barge-in) leave the played count and play again."""
    sig = (0.1 + np.arange(9600) / 9600 * 0.8).astype(np.float32)  # each sample distinct, never 0
    async def main():
        p = Playout(24000)
        p.start_reply(1)
        assert await p.put(1, sig)
        p.end_reply(1)
        f1, f2 = p.next_frame(), p.next_frame()
        assert np.array_equal(np.concatenate([f1.pcm, f2.pcm]), sig[:960]) and p.played == 960
        p.pause()
        assert p.rewind(1) == 480 and p.played == 480  # f2 was not heard
        fade = p.next_frame()
        assert fade.reply_id is None and p.played == 480
        assert abs(fade.pcm[0] - sig[480]) < 1e-6  # continues f1 exactly
        assert np.all(np.abs(np.diff(fade.pcm)) < 0.02) and not fade.pcm[240:].any()  # 10 ms down, no step
        assert not p.next_frame().pcm.any()
        p.resume()
        back = p.next_frame()
        assert back.reply_id == 1 and p.played == 960
        assert back.pcm[0] == 0 and np.allclose(back.pcm[240:], sig[720:960])  # faded in, then as before
        assert np.all(np.abs(np.diff(back.pcm)) < 0.02)
        p.drop()  # a reply dropped while heard fades out too
        assert p.active is None

    run_virtual(main())
