"""The TTS frame step run ahead: each tick launches the next frame of the replies that go on before it
hands their audio over (the next frame's input stays on the device), so on a GPU the device computes
frame k+1 while the host books frame k and passes its audio on (``Scheduler(ahead=...)``).

What must hold: every reply's codes are those made without running ahead and its audio the same up
to the rounding of a batched step (replies joining at different frames, several segments each,
sampled with their seeds), and a frame is in flight at most of the moments a reader takes audio."""

from __future__ import annotations

import asyncio

import numpy as np

from step_log import in_flight, in_flight_when_taken, log_steps
from tts_fixtures import collect, make_engine, make_tts, one_torch_thread, tiny_tts_checkpoint  # noqa: F401

TEXTS = [("Hello there, how are you today? I am fine.", 0.0), ("A second voice joins in here.", 0.05),
         ("Third. It speaks in two parts.", 0.02)]


async def _speak(tts) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each reply's audio and codes."""
    async def one(text: str, delay: float) -> tuple[np.ndarray, np.ndarray]:
        await asyncio.sleep(delay)
        stream = tts.new_stream()
        audio = np.concatenate([c.pcm for c in await collect(stream, text)])
        return audio, stream.last_codes().numpy()

    return list(await asyncio.gather(*(one(text, delay) for text, delay in TEXTS)))


async def test_audio_made_ahead_is_the_audio_made_without(make_tts):
    """Three replies with the frame run ahead and without it: the same codes and audio; with it,
    frames were launched ahead and one was in flight at most of the moments a reader took audio."""
    plain = make_tts(chunk_frames=1, seed=3)
    plain.scheduler.ahead = None
    expected = await _speak(plain)

    tts = make_tts(chunk_frames=1, seed=3)
    log = log_steps(tts.run_ahead, tts.scheduler)
    got = await _speak(tts)
    for (audio, codes), (audio0, codes0) in zip(got, expected):
        assert np.array_equal(codes, codes0) and len(audio) > 0
        # the same samples up to the rounding of a batched step whose rows differ (as alone vs. batched)
        assert audio.shape == audio0.shape and float(np.abs(audio - audio0).max()) <= 1e-5
    taken = in_flight_when_taken(log)
    assert sum(taken) >= 0.6 * len(taken), (sum(taken), len(taken))
    assert all(0 <= n <= 1 for n in in_flight(log))
    assert tts.engine.free_slots == tts.engine.slots
