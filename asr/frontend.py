"""Exact incremental log-mel features: the offline NeMo preprocessor's values, computed live.

NeMo's ``FilterbankFeatures`` on a whole signal does: pre-emphasis ``y[n] = x[n] - a*x[n-1]``
(``y[0] = x[0]``), zero padding of ``pad_left`` samples on both sides (``n_fft // 2`` with a centred
STFT), a Hann-windowed STFT, magnitude to the power ``mag_power``, a mel filterbank and
``log(x + guard)``. Frame ``t`` therefore reads ``y[t*hop - pad_left : t*hop - pad_left + n_fft]``,
but its window is non-zero only on ``win`` samples in the middle: the frame is final as soon as
those samples have arrived (:meth:`MelSpec.frames_ready`). Computing each frame from exactly its
own samples, with the same operations in the same order, gives the offline values (to float
rounding), whatever the packet sizes; nothing is computed per chunk with edge effects.

Only streamable front ends are accepted: no per-utterance normalisation, no frame splicing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from duplex.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class MelSpec:
    """The front end's parameters, read from a NeMo preprocessor (tensors on the model's device)."""

    sample_rate: int
    hop: int
    win: int
    n_fft: int
    pad_left: int  # zeros the offline STFT puts before sample 0
    preemph: float | None
    mag_power: float
    log: bool
    guard_clamp: bool  # log(max(x, guard)) instead of log(x + guard)
    guard: float
    n_mels: int
    window: torch.Tensor  # [win] float32
    fb: torch.Tensor  # [1, n_mels, n_fft // 2 + 1] float32

    @classmethod
    def from_nemo(cls, preprocessor) -> MelSpec:
        """Read (and check) the featurizer of an ``AudioToMelSpectrogramPreprocessor``."""
        import torch
        from nemo.collections.asr.parts.preprocessing.features import FilterbankFeatures

        feat = getattr(preprocessor, "featurizer", None)
        if not isinstance(feat, FilterbankFeatures):
            raise ConfigError(f"the ASR model's preprocessor ({type(preprocessor).__name__}) is not a log-mel "
                              "filterbank; streaming needs NeMo's AudioToMelSpectrogramPreprocessor")
        normalize = feat.normalize
        if isinstance(normalize, str) and normalize.lower() in ("per_feature", "all_features") or (
                not isinstance(normalize, (str, type(None), bool))):
            raise ConfigError(f"the ASR model normalises features per utterance (normalize={normalize!r}), "
                              "which cannot be computed live; use a cache-aware streaming model "
                              "(normalize: NA)")
        if feat.frame_splicing != 1:
            raise ConfigError("the ASR model splices frames (frame_splicing > 1); not supported for streaming")
        if feat.window is None:
            raise ConfigError("the ASR model's STFT has no window; not supported for streaming")
        guard = feat.log_zero_guard_value_fn(torch.zeros((), dtype=torch.float32))
        pad_left = feat.stft_pad_amount if feat.exact_pad else feat.n_fft // 2
        return cls(sample_rate=int(feat.sample_rate), hop=int(feat.hop_length), win=int(feat.win_length),
                   n_fft=int(feat.n_fft), pad_left=int(pad_left),
                   preemph=None if feat.preemph is None else float(feat.preemph),
                   mag_power=float(feat.mag_power), log=bool(feat.log),
                   guard_clamp=feat.log_zero_guard_type == "clamp", guard=float(guard), n_mels=int(feat.nfilt),
                   window=feat.window.detach().to(torch.float32).clone(),
                   fb=feat.fb.detach().to(torch.float32).clone())

    def to(self, device: str) -> MelSpec:
        from dataclasses import replace

        return replace(self, window=self.window.to(device), fb=self.fb.to(device))

    # -- frame arithmetic (plain ints; cheap enough for the event loop) --------------------------------

    def _win_end(self, t: int) -> int:
        """One past the last input sample frame ``t``'s (non-zero) window reads."""
        return t * self.hop - self.pad_left + (self.n_fft - self.win) // 2 + self.win

    def first_sample(self, t: int) -> int:
        """First input sample of frame ``t``'s STFT segment (may be negative: left zero padding)."""
        return t * self.hop - self.pad_left

    def samples_needed(self, n_frames: int) -> int:
        """Input samples needed before the first ``n_frames`` frames are final."""
        return 0 if n_frames <= 0 else max(0, self._win_end(n_frames - 1))

    def frames_ready(self, n_samples: int) -> int:
        """How many frames are final once ``n_samples`` input samples have arrived."""
        # _win_end(t) <= n  <=>  t <= (n - _win_end(0)) / hop
        return max(0, (n_samples - self._win_end(0)) // self.hop + 1)

    def offline_frames(self, n_samples: int) -> int:
        """Frames the offline preprocessor marks valid for a signal of ``n_samples`` samples."""
        return max(0, (n_samples + 2 * self.pad_left - self.n_fft) // self.hop)


@dataclass
class AudioBuffer:
    """A session's raw input: the samples still needed by frames not computed yet.

    ``x[i]`` holds input sample ``base + i``. ``fed`` counts every sample received since the start.
    """

    x: np.ndarray
    base: int = 0
    fed: int = 0

    @classmethod
    def empty(cls) -> AudioBuffer:
        return cls(np.zeros(0, dtype=np.float32))

    def append(self, pcm: np.ndarray) -> None:
        self.x = np.concatenate([self.x, pcm]) if self.x.size else pcm.astype(np.float32, copy=True)
        self.fed += int(pcm.size)

    def window(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` of the input, zeros outside what is held (before 0 or not yet fed)."""
        out = np.zeros(stop - start, dtype=np.float32)
        lo, hi = max(start, self.base), min(stop, self.base + self.x.size)
        if hi > lo:
            out[lo - start:hi - start] = self.x[lo - self.base:hi - self.base]
        return out

    def drop_before(self, index: int) -> None:
        """Forget samples before input index ``index``."""
        cut = min(max(0, index - self.base), self.x.size)
        if cut:
            self.x = self.x[cut:]  # a view; the next append copies what is left
            self.base += cut


def frame_segment(spec: MelSpec, audio: AudioBuffer, t0: int, t1: int) -> np.ndarray:
    """Pre-emphasised input covering frames ``t0:t1``: ``(t1 - t0 - 1) * hop + n_fft`` samples.

    Samples before the signal start are the offline left padding (zeros); samples not fed yet lie
    outside these frames' windows (or are the end padding when flushing) and are zeros too.
    """
    start = spec.first_sample(t0)
    stop = spec.first_sample(t1 - 1) + spec.n_fft
    if spec.preemph is None:
        return audio.window(start, stop)
    # One sample of history for the pre-emphasis; before the signal start it reads zeros, which
    # also gives y[0] = x[0] and keeps the left padding zero.
    raw = audio.window(start - 1, stop)
    seg = raw[1:] - np.float32(spec.preemph) * raw[:-1]
    # Offline, the end padding is added after the pre-emphasis: samples not fed yet must stay zero.
    unfed = audio.fed - start
    if unfed < seg.size:
        seg[max(unfed, 0):] = 0.0
    return seg


def log_mel(spec: MelSpec, segments: torch.Tensor) -> torch.Tensor:
    """Log-mel frames of ``segments`` [B, S] (each from :func:`frame_segment`): [B, n_mels, T].

    The same operations as NeMo's ``FilterbankFeatures.forward``, in the same order.
    """
    import torch

    x = torch.stft(segments, n_fft=spec.n_fft, hop_length=spec.hop, win_length=spec.win, center=False,
                   window=spec.window, return_complex=True)
    x = torch.view_as_real(x)
    x = torch.sqrt(x.pow(2).sum(-1))
    if spec.mag_power != 1.0:
        x = x.pow(spec.mag_power)
    x = torch.matmul(spec.fb, x)
    if spec.log:
        x = torch.log(torch.clamp(x, min=spec.guard)) if spec.guard_clamp else torch.log(x + spec.guard)
    return x
