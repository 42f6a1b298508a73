"""The echo guard of ``duplex mic``: the agent's own voice, played on open speakers, must never count
as the user speaking (a false barge-in). It uses what the agent is playing as a reference.

Two stages on 20 ms blocks at 16 kHz, with the reference already aligned to the microphone by the
device's known latency (see :mod:`.mic`):

1. :class:`EchoCanceller`: a partitioned-block frequency-domain adaptive filter (MDF/PBFDAF, NLMS
   step per frequency bin, gradient constraint) that models the speaker-room-microphone path over
   ``tail_ms`` and subtracts the predicted echo. It adapts only while the reference plays and the
   user is judged silent, so double talk does not make it diverge.
2. :class:`EchoGuard`: a gate on the residual. While the agent's voice is (or was, within the echo
   tail) playing, a block passes to the session only if the residual is louder than the echo still
   expected from the reference by ``margin_db``; the expected level is a learned coupling factor
   (the peak envelope of residual over reference energy in echo-only blocks: high before the
   canceller converges, low after) times the reference's recent peak energy. Otherwise the session hears silence. With no
   reference playing the microphone passes unchanged.

The user talking over the agent still gets through when they are louder than the remaining echo:
after convergence that is a low bar; before it (the first second of the first reply) only clearly
louder speech passes. A false barge-in needs the agent's voice to pass the gate, which it does not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

RATE = 16_000
BLOCK = 320  # 20 ms


class EchoCanceller:
    """Frequency-domain adaptive echo canceller (see module docstring): :meth:`predict` the echo of
    the next aligned reference block, :meth:`adapt` on the residual; :meth:`process` does both."""

    def __init__(self, tail_ms: int = 250, block: int = BLOCK, rate: int = RATE, mu: float = 1.0) -> None:
        self.block = block
        self.parts = max(1, int(np.ceil(tail_ms * rate / 1000 / block)))
        self.mu = mu
        bins = block + 1
        self.X = np.zeros((self.parts, bins), np.complex128)  # reference spectra, newest first  [P, N+1]
        self.W = np.zeros((self.parts, bins), np.complex128)  # the filter, one partition per block [P, N+1]
        self.power = np.full(bins, 1e-6)  # smoothed reference power per bin
        self.prev = np.zeros(block, np.float64)  # the previous reference block

    def reset(self) -> None:
        self.X[:] = 0
        self.W[:] = 0
        self.power[:] = 1e-6
        self.prev[:] = 0

    def predict(self, ref: np.ndarray) -> np.ndarray:
        """Take the next reference block; return the echo it predicts for the microphone block."""
        n = self.block
        assert ref.shape == (n,), ref.shape
        ref = ref.astype(np.float64)
        self.X = np.roll(self.X, 1, axis=0)
        self.X[0] = np.fft.rfft(np.concatenate([self.prev, ref]))  # overlap-save window [2N]
        self.prev = ref
        self.power = 0.9 * self.power + 0.1 * np.abs(self.X[0]) ** 2
        return np.fft.irfft((self.W * self.X).sum(axis=0), 2 * n)[n:]  # [N]

    def adapt(self, err: np.ndarray) -> None:
        """One NLMS step towards removing ``err`` (microphone minus the last prediction)."""
        n = self.block
        E = np.fft.rfft(np.concatenate([np.zeros(n), err.astype(np.float64)]))
        step = self.mu / (self.parts * self.power + 1e-4 * n)  # per bin [N+1]; the floor: no steps on hiss
        grad = np.conj(self.X) * (E * step)[None, :]  # [P, N+1]
        g = np.fft.irfft(grad, 2 * n, axis=1)
        g[:, n:] = 0  # gradient constraint: each partition stays a causal N-tap filter
        self.W += np.fft.rfft(g, axis=1)

    def process(self, mic: np.ndarray, ref: np.ndarray, adapt: bool = True) -> np.ndarray:
        err = mic.astype(np.float64) - self.predict(ref)
        if adapt:
            self.adapt(err)
        return err.astype(np.float32)


@dataclass
class GuardStats:
    blocks: int = 0
    guarded: int = 0  # blocks with the reference active
    passed: int = 0  # ... of which the user was let through
    coupling: float = 1.0


class EchoGuard:
    """Canceller + residual gate (see module docstring). Feed 20 ms blocks at 16 kHz with
    :meth:`process`; the result is what the session should hear."""

    def __init__(self, tail_ms: int = 250, margin_db: float = 6.0, hangover_ms: int = 160,
                 silence_dbfs: float = -60.0, prior: float = 4.0, release: float = 0.95) -> None:
        self.canceller = EchoCanceller(tail_ms)
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
        self._ref_energy: deque[float] = deque(maxlen=self.canceller.parts + 2)
        self.stats = GuardStats()

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        self._ref_energy.append(float(np.mean(np.square(ref, dtype=np.float64))))
        peak = max(self._ref_energy)
        active = peak > self.floor
        # Decide on the residual of the filter as it stands; adapt only on echo-only blocks.
        residual = (mic.astype(np.float64) - self.canceller.predict(ref)).astype(np.float32)
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
                self.canceller.adapt(residual)
        self.stats.coupling = self.coupling
        if user or self._held:
            self.stats.passed += 1
            return residual
        return np.zeros_like(residual)
