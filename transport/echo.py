"""The echo guard of ``duplex mic``: the agent's own voice, played on open speakers, must never count
as the user speaking (a false barge-in). It uses what the agent is playing as a reference.

Two stages on 20 ms blocks at 16 kHz, with the reference already aligned to the microphone by the
device's known latency (see :mod:`.mic`):

1. :class:`WebRtcCanceller`: WebRTC's echo canceller (AEC3, the one browsers use behind
   ``getUserMedia({echoCancellation: true})``), through the ``livekit`` package's
   ``rtc.AudioProcessingModule``. It estimates the echo path's delay itself, adapts through double
   talk and suppresses the residual echo a linear filter leaves (a speaker that distorts).
2. :class:`EchoGuard`: a gate on the residual. While the agent's voice is (or was, within the echo
   tail) playing, a block passes to the session only if the residual is louder than the echo still
   expected from the reference by ``margin_db``; the expected level is a learned coupling factor
   (the peak envelope of residual over reference energy in echo-only blocks: high before the
   canceller converges, low after) times the reference's recent peak energy. Otherwise the session
   hears silence. With no reference playing the microphone passes unchanged by the gate.

Why this pair (``duplex bench echo``; the side-by-side with the hand-written canceller this replaced:
``python tools/echo-compare.py``; figures in docs/DESIGN.md, "Echo"): AEC3 cancels 43 dB of a
room's echo once converged where the hand-written frequency-domain NLMS filter cancelled 37, 42 dB
of a clipping speaker's echo where it cancelled 13, and it does not care where within 200 ms the
echo really is. It needs about two seconds to converge, and alone it lets the start of the first
reply through (the VAD heard the agent at 1.0 and 1.7 s: a self-interruption); the gate, whose
prior assumes the worst until it has measured the room, closes that window.

The user talking over the agent still gets through when they are louder than the remaining echo:
after convergence that is a low bar; before it (the first second of the first reply) only clearly
louder speech passes. A false barge-in needs the agent's voice to pass the gate, which it does not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from duplex.requirements import import_extra

RATE = 16_000
BLOCK = 320  # 20 ms


class Canceller(Protocol):
    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """The microphone block with the echo of the aligned reference block removed."""
        ...


def _livekit_rtc() -> Any:
    return import_extra("livekit.rtc", "the echo canceller of duplex mic")


class WebRtcCanceller:
    """WebRTC's AEC3 on 20 ms float blocks at 16 kHz (two of its 10 ms frames each). The reference
    given with a microphone block is the one aligned to it; the module estimates what delay is left."""

    def __init__(self, rate: int = RATE) -> None:
        rtc = _livekit_rtc()
        self._frame = rtc.AudioFrame
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True)
        self.rate, self.step = rate, rate // 100

    def _int16(self, pcm: np.ndarray) -> bytes:
        return (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16).tobytes()

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        assert mic.shape == ref.shape and len(mic) % self.step == 0, (mic.shape, ref.shape)
        out = np.empty(len(mic), np.float32)
        for i in range(0, len(mic), self.step):
            far = self._frame(self._int16(ref[i:i + self.step]), self.rate, 1, self.step)
            self._apm.process_reverse_stream(far)
            near = self._frame(self._int16(mic[i:i + self.step]), self.rate, 1, self.step)
            self._apm.set_stream_delay_ms(0)  # the reference is aligned; AEC3 finds the rest
            self._apm.process_stream(near)  # in place
            out[i:i + self.step] = np.frombuffer(near.data, np.int16).astype(np.float32) / 32767
        return out


@dataclass
class GuardStats:
    blocks: int = 0
    guarded: int = 0  # blocks with the reference active
    passed: int = 0  # ... of which the user was let through
    coupling: float = 1.0


class EchoGuard:
    """Canceller + residual gate (see module docstring). Feed 20 ms blocks at 16 kHz with
    :meth:`process`; the result is what the session should hear."""

    def __init__(self, canceller: Canceller | None = None, tail_ms: int = 250, margin_db: float = 6.0,
                 hangover_ms: int = 160, silence_dbfs: float = -60.0, prior: float = 4.0,
                 release: float = 0.98) -> None:
        self.canceller = canceller if canceller is not None else WebRtcCanceller()
        self.margin = 10 ** (margin_db / 10)
        self.floor = 10 ** (silence_dbfs / 10)  # reference energy below this is no reference at all
        # The most residual energy the echo alone leaves, relative to the reference's peak energy: an
        # envelope that sinks by `release` per echo-only block (to the level of such blocks) and rises
        # slowly through blocks above it but not clearly the user (a louder room, a worse filter). It
        # starts at `prior` (the echo 6 dB louder than the reference), a safe guess before anything is
        # learned: until it has decayed to the room's real coupling only clearly louder speech passes.
        self.coupling = prior
        self.release = release
        self.attack = 10 ** (0.5 / 10)  # +0.5 dB per block at most: a user's onset outruns it
        self._run = 0
        self.hangover = hangover_ms // 20
        self._held = 0
        self._ref_energy: deque[float] = deque(maxlen=tail_ms // 20 + 2)  # the echo tail, in blocks
        self.stats = GuardStats()

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        self._ref_energy.append(float(np.mean(np.square(ref, dtype=np.float64))))
        peak = max(self._ref_energy)
        active = peak > self.floor
        residual = self.canceller.process(mic, ref)
        energy = float(np.mean(np.square(residual, dtype=np.float64)))
        self.stats.blocks += 1
        if not active:
            self._held = 0
            return residual
        self.stats.guarded += 1
        ratio = energy / peak
        user = ratio > self.margin * self.coupling and energy > self.floor
        if user:
            self._run += 1
            if self._run >= 2:  # a lone loud block passes alone; a run of them keeps the gate open
                self._held = self.hangover
        else:
            self._run = 0
            if self._held:
                self._held -= 1
            elif ratio > self.coupling:  # louder than the echo has been, not clearly the user: wait
                self.coupling = min(ratio, self.coupling * self.attack, 16.0)
            else:  # echo only: learn the room, and let the learned level sink towards it
                self.coupling = max(ratio, self.coupling * self.release, 1e-5)
        self.stats.coupling = self.coupling
        if user or self._held:
            self.stats.passed += 1
            return residual
        return np.zeros_like(residual)
