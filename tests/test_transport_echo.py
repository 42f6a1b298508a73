"""The echo guard of ``duplex mic`` on a simulated room: real speech as the agent's voice, played
through a speaker-room-microphone path (delay, reverberant tail, gain), judged by the real Silero VAD
that decides barge-ins in a session."""

from __future__ import annotations

import asyncio

import numpy as np

from duplex import events as ev
from duplex.transport.echo import BLOCK, EchoCanceller, EchoGuard
from tests.transport_fixtures import room_echo

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
    """The adaptive filter removes at least 20 dB of a speech echo once it has heard a few seconds
    (echo return loss enhancement over seconds 6-10), and does nothing to a microphone without echo."""
    ref = jfk16[:10 * RATE]
    echo = room_echo(ref)
    out = _blocks(echo, ref, EchoCanceller().process)
    late = slice(6 * RATE, 10 * RATE)
    assert _db(echo[late], out[late]) > 20
    user = jfk16[:3 * RATE]
    passed = _blocks(user, np.zeros_like(user), EchoCanceller().process)
    assert np.allclose(passed, user[:len(passed)], atol=1e-6)


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
