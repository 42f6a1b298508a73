"""A session's recording (duplex.recording): a stereo WAV whose left channel is the user as received
and whose right channel is the agent as played, on the input stream's clock, so both line up with
the events' times; a transcript whose agent words are the ones heard, at the times they played."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np

from duplex import events as ev
from duplex.clock import run_virtual
from duplex.events import INPUT_RATE
from duplex.playout import Frame
from duplex.recording import Recording
from tests.fake_agent import clip, drive, make_agent, silence

REPLY = "one two three four five six seven eight nine ten"
FRAME_S = 0.02


def _read(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 2 and w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2).astype(np.float32) / 32767
        return w.getframerate(), data


def _loud(channel: np.ndarray, rate: int, start_s: float, end_s: float) -> bool:
    part = channel[int(start_s * rate):int(end_s * rate)]
    return bool(part.size) and float(np.abs(part).max()) > 0.05


def test_a_barge_in_recording_lines_up_with_the_events_and_keeps_what_was_heard(vad_model, jfk16, tmp_path):
    """The user's speech is in the left channel where the session heard it (its VAD onset within 20 ms
    of the audio's own); the agent's audio starts in the right channel at its AudioOut event (within
    20 ms), is silent from the barge-in until the next reply, and the transcript's agent words are the
    words heard, each at a time where its beep is in the right channel."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there", "stop now please"]},
                       llm={"replies": [REPLY, "okay"]})
    speech = clip(jfk16, 0.2, 2.4)
    pcm = np.concatenate([speech, silence(2.8), clip(jfk16, 5.3, 7.8), silence(4.0)])
    folder = tmp_path / "rec"

    async def talk():
        return await drive(agent, pcm, session=agent.session(record=folder))

    run = run_virtual(talk())

    rate, audio = _read(folder / "audio.wav")
    user, agent_out = audio[:, 0], audio[:, 1]
    assert rate == 24_000
    assert abs(len(audio) / rate - run.pushed_s) < 0.1  # one clock: the input's

    # left: the input, resampled (the same loudness, 20 ms by 20 ms)
    frame = int(FRAME_S * rate)
    expected = np.concatenate([pcm, np.zeros(len(user), np.float32)])  # the input, then silence
    def rms(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(x))))

    left_env = [rms(user[i:i + frame]) for i in range(0, len(user) - frame, frame)]
    want_env = [rms(expected[int(i * 2 / 3):int((i + frame) * 2 / 3)]) for i in range(0, len(user) - frame, frame)]
    diff = np.abs(np.array(left_env) - np.array(want_env))
    assert float(diff.max()) < 0.005 and max(want_env) > 0.05

    # right: the agent from its first audible frame, on the events' clock
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events] == [e.type for e in run.events if not isinstance(e, ev.AudioIn)]
    first_out, = [e for e in events if e["type"] == ev.AudioOut.type and e["reply_id"] == 1]
    out1, out2 = run.of(ev.AudioOut)
    barge, = run.of(ev.BargeIn)
    onset = int(np.argmax(np.abs(agent_out) > 0.01)) / rate
    assert abs(onset - (out1.wall - run.t0)) <= FRAME_S + 1e-6
    assert abs(onset - first_out["t"]) <= FRAME_S + 1e-4
    assert _loud(agent_out, rate, out1.wall - run.t0, barge.wall - run.t0)
    # after the barge-in (the frame in flight aside), nothing of reply 1 until reply 2
    quiet = agent_out[int((barge.wall - run.t0 + 2 * FRAME_S) * rate):int((out2.wall - run.t0) * rate)]
    assert quiet.size and float(np.abs(quiet).max()) < 1e-3

    transcript = json.loads((folder / "transcript.json").read_text())
    interrupted, = run.of(ev.Interrupted)
    said = [t for t in transcript["turns"] if t["role"] == "assistant"]
    assert said[0]["text"] == interrupted.heard and said[0]["interrupted"]
    assert [w["text"] for w in said[0]["words"]] == interrupted.heard.split()
    for word in said[0]["words"]:  # the beep of each heard word is where the transcript says
        assert _loud(agent_out, rate, word["start_s"], word["start_s"] + 0.1)
        assert word["end_s"] <= barge.wall - run.t0 + 2 * FRAME_S
    users = [t for t in transcript["turns"] if t["role"] == "user"]
    assert [t["text"] for t in users] == ["hello there", "stop now please"]
    assert [t["role"] for t in transcript["turns"]] == ["user", "assistant", "user", "assistant"]
    assert json.loads((folder / "conversation.json").read_text()) == run.conversation


def test_frames_taken_back_at_a_barge_in_are_silence_and_not_heard(tmp_path):
    """Frames a live output gave back unheard become silence in the right channel, and a word that
    played only in them gets its time from where it played again after the resume."""
    import asyncio

    from duplex.conversation import AgentTurn, Conversation

    rate, n = 24_000, 480

    async def main() -> dict:
        rec = Recording(tmp_path, rate)
        tone = np.full(n, 0.5, np.float32)
        for k in range(4):  # 4 frames of reply 7 at input positions 0, 320, ...
            rec.user(np.zeros(320, np.float32))
            rec.agent(Frame(pcm=tone, reply_id=7, played=(k + 1) * n, finished=False), k * 320)
        rec.unplay(2)  # the last two were never heard
        for k in range(4, 8):  # they play again later, after a gap of one frame of silence
            rec.user(np.zeros(320, np.float32))
            rec.agent(Frame(pcm=tone, reply_id=7, played=(k - 1) * n, finished=k == 7), (k + 1) * 320)
        conversation = Conversation()
        turn = conversation.reply_started(7, 0, rate, 0.0)
        turn.words = [ev.Word("early", 0, n), ev.Word("again", 2 * n, 3 * n)]
        turn.played = 6 * n
        conversation.reply_closed(7, interrupted=False)
        assert isinstance(turn, AgentTurn)
        await rec.close(conversation)
        return json.loads((tmp_path / "transcript.json").read_text())

    transcript = asyncio.run(main())
    _, audio = _read(tmp_path / "audio.wav")
    right = audio[:, 1]
    assert np.all(right[:2 * n] > 0.4) and np.all(right[2 * n:5 * n] == 0) and np.all(right[5 * n:9 * n] > 0.4)
    (said,) = transcript["turns"]
    assert [(w["text"], w["start_s"]) for w in said["words"]] == [("early", 0.0), ("again", 5 * n / rate)]


def test_a_run_of_frames_is_one_placement_and_a_take_back_cuts_it(tmp_path):
    """Frames of a reply that play back to back are kept as one run (one entry, not one per frame,
    for the transcript's word times); when the output gives its last two frames back (a barge-in),
    those samples are silence and the run ends where they began; played again on resume, the same
    reply samples are placed where they play then, and the channel written out holds exactly that."""
    import asyncio

    from duplex.recording import _Placed

    async def main() -> Recording:
        rec = Recording(tmp_path, 24_000)
        for k in range(5):  # 20 ms frames: 480 samples at 24 kHz, 320 input samples apart
            rec.agent(Frame(np.full(480, 0.5, np.float32), 1, 480 * (k + 1), False), 320 * k)
        assert rec._replies[1] == [_Placed(at=0, before=0, after=2400)]
        rec.unplay(2)
        for k, played in ((8, 1920), (9, 2400)):  # resumed later: the two frames play again
            rec.agent(Frame(np.full(480, 0.25, np.float32), 1, played, False), 320 * k)
        rec._writer.cancel()
        return rec

    rec = asyncio.run(main())
    assert rec._replies[1] == [_Placed(at=0, before=0, after=1440), _Placed(at=3840, before=1440, after=2400)]
    assert rec._reply_time(1, 100) == 100 / 24_000 and rec._reply_time(1, 1500) == (3840 + 60) / 24_000
    agent = rec._agent.take(4800)
    assert np.all(agent[:1440] == 0.5) and np.all(agent[1440:3840] == 0.0) and np.all(agent[3840:] == 0.25)
