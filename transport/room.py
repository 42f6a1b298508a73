"""A simulated room for the echo guard's tests and benchmark: what a microphone hears of a speaker
(a direct path after a delay, then a reverberant tail), as a linear impulse response."""

from __future__ import annotations

import numpy as np


def room_response(gain: float = 0.6, delay_ms: float = 30.0, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """The impulse response from a speaker to a microphone in a room: a direct path after
    ``delay_ms`` and a reverberant tail (decaying noise, ~60 ms, half the direct path's energy),
    scaled by ``gain``."""
    rng = np.random.default_rng(seed)
    d, n = int(delay_ms * rate / 1000), int(0.12 * rate)
    tail = rng.standard_normal(n) * np.exp(-np.arange(n) / (0.02 * rate))
    tail *= np.sqrt(0.5 / np.sum(tail ** 2))
    h = np.zeros(d + rate // 800 + n)
    h[d] = 1.0
    h[d + rate // 800:] += tail
    return gain * h


def room_echo(ref: np.ndarray, gain: float = 0.6, delay_ms: float = 30.0, rate: int = 16_000,
              seed: int = 0) -> np.ndarray:
    """``ref`` as a microphone hears it from a speaker in a room (see :func:`room_response`)."""
    return np.convolve(ref, room_response(gain, delay_ms, rate, seed))[:len(ref)].astype(np.float32)
