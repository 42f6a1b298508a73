"""The echo guard of ``duplex mic`` on a simulated room: real speech as the agent's voice, played
through a speaker-room-microphone path (delay, reverberant tail, gain), judged by the real Silero VAD
that decides barge-ins in a session."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from duplex import events as ev
from duplex.errors import DependencyError
from duplex.transport.echo import BLOCK, EchoGuard, WebRtcCanceller
from duplex.transport.echo_bench import rooms
from duplex.transport.room import room_echo

RATE = 16_000


def _blocks(mic: np.ndarray, ref: np.ndarray, fn) -> np.ndarray:
    n = (len(mic) // BLOCK) * BLOCK
    return np.concatenate([fn(mic[i:i + BLOCK], ref[i:i + BLOCK]) for i in range(0, n, BLOCK)])


def _speech_starts(vad_model, pcm: np.ndarray) -> list[float]:
    async def run() -> list[float]:
        stream = vad_model.new_stream()
        starts = []
        for i in range(0, len(pcm), BLOCK):
            for e in await stream.feed(pcm[i:i + BLOCK]):
                if isinstance(e, ev.SpeechStarted):
                    starts.append(e.start / RATE)
        await stream.aclose()
        return starts

    return asyncio.run(run())


def _db(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(a, dtype=np.float64)) / np.mean(np.square(b, dtype=np.float64))))


def test_canceller_learns_the_room(jfk16):
    """WebRTC's AEC3 removes at least 30 dB of a speech echo once it has heard a few seconds (echo
    return loss enhancement over seconds 6-10), and keeps a microphone without echo at its level."""
    ref = jfk16[:10 * RATE]
    echo = room_echo(ref)
    out = _blocks(echo, ref, WebRtcCanceller().process)
    late = slice(6 * RATE, 10 * RATE)
    assert _db(echo[late], out[late]) > 30
    user = jfk16[:3 * RATE]
    passed = _blocks(user, np.zeros_like(user), WebRtcCanceller().process)
    assert abs(_db(passed, user[:len(passed)])) < 1


def test_no_self_interruption_in_hard_rooms(vad_model, jfk16):
    """The rooms where the hand-written canceller this replaced let the agent's voice through
    (tools/echo-compare.py): a speaker that clips (a non-linear echo) and echoes 80 and 200 ms later
    than the device's latency says. The VAD hears speech in each raw microphone and none after the
    guard."""
    scenarios = rooms(jfk16)
    for name in ("clipping speaker", "echo 80 ms late", "echo 200 ms late"):
        mic, ref = scenarios[name]
        assert _speech_starts(vad_model, mic), name
        assert _speech_starts(vad_model, _blocks(mic, ref, EchoGuard().process)) == [], name


def test_missing_livekit_is_named_with_its_extra(monkeypatch):
    """Without the livekit package the echo guard refuses to start with the pip extra to install,
    instead of running duplex mic without a canceller."""
    import sys

    monkeypatch.setitem(sys.modules, "livekit", None)  # import livekit raises ImportError
    with pytest.raises(DependencyError, match=r"livekit.*\.\[mic\]"):
        EchoGuard()


def test_agent_voice_on_open_speakers_never_reaches_the_vad(vad_model, jfk16):
    """JFK's speech played as the agent's voice comes back loud into the microphone: the VAD hears
    speech in the raw microphone (so a session would barge in on itself), and none after the guard,
    from the first block on (before the canceller has converged)."""
    ref = jfk16[:11 * RATE]
    mic = room_echo(ref, gain=0.7) + np.random.default_rng(1).normal(0, 1e-3, len(ref)).astype(np.float32)
    assert len(_speech_starts(vad_model, mic)) >= 3
    guard = EchoGuard()
    guarded = _blocks(mic, ref, guard.process)
    assert _speech_starts(vad_model, guarded) == []
    assert guard.stats.guarded > 0.9 * guard.stats.blocks and guard.stats.coupling < 0.05


def test_user_talking_over_the_agent_gets_through(vad_model, jfk16):
    """While the agent's voice echoes, the user starts talking at 4 s: the guarded microphone gives
    the VAD the user's speech onset within 0.3 s and keeps most of its energy; the agent's echo alone
    (before 4 s) triggers nothing."""
    ref = np.concatenate([jfk16[:7 * RATE], np.zeros(3 * RATE, np.float32)])  # the agent speaks 0-7 s
    user = np.zeros_like(ref)
    phrase = jfk16[int(8.19 * RATE):int(10.6 * RATE)]  # "ask what you can do for your country"
    user[4 * RATE:4 * RATE + len(phrase)] = phrase
    mic = room_echo(ref, gain=0.5) + user
    guarded = _blocks(mic, ref, EchoGuard().process)
    starts = _speech_starts(vad_model, guarded)
    assert starts and 4.0 <= starts[0] < 4.3, starts
    span = slice(4 * RATE, 4 * RATE + len(phrase))
    assert _db(guarded[span], user[span]) > -3  # the user's speech passes nearly whole
