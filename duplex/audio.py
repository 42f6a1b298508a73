"""PCM conversion, validation, streaming resampling and audio files.

The pipeline's internal format is float32 mono in [-1, 1]: 16 kHz on the input side, the TTS model's
rate on the output side. :func:`to_mono_float` is the one place user audio is checked and converted;
:class:`StreamResampler` is the one streaming resampler (stateful across blocks, so block boundaries
add no clicks; a short polyphase FIR between the path's integer-ratio rates, soxr otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duplex.errors import AudioFormatError


def to_mono_float(pcm: np.ndarray, sample_rate: int, *, channels_last: bool = True) -> np.ndarray:
    """Validate ``pcm`` and convert it to float32 mono in [-1, 1].

    Accepts int16 (full scale 32768), int32 (full scale 2**31), float32/float64 in [-1, 1]; shapes
    ``[T]`` or ``[T, C]`` (``[C, T]`` with ``channels_last=False``); channels are averaged. NaN and
    infinite values are replaced by 0 (a broken microphone must not poison model state); float input
    beyond [-1, 1] is clipped.
    """
    if not isinstance(pcm, np.ndarray):
        pcm = np.asarray(pcm)
    if not isinstance(sample_rate, (int, np.integer)) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise AudioFormatError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")
    if pcm.ndim == 2 and not channels_last:
        pcm = pcm.T
    if pcm.ndim == 2 and pcm.shape[1] > 8 and pcm.shape[0] <= 8:
        raise AudioFormatError(f"audio of shape {pcm.shape} looks channels-first; pass [samples, channels] "
                               "(or channels_last=False)")
    if pcm.ndim not in (1, 2):
        raise AudioFormatError(f"audio must be 1-D [samples] or 2-D [samples, channels], got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        out = pcm.astype(np.float32) / 32768.0
    elif pcm.dtype == np.int32:
        out = (pcm / 2147483648.0).astype(np.float32)
    elif pcm.dtype == np.uint8:
        out = (pcm.astype(np.float32) - 128.0) / 128.0
    elif pcm.dtype.kind == "f":
        out = pcm.astype(np.float32, copy=True)
        out[~np.isfinite(out)] = 0.0
        np.clip(out, -1.0, 1.0, out=out)
    else:
        raise AudioFormatError(f"unsupported sample type {pcm.dtype}; use int16, int32 or float32 in [-1, 1]")
    if out.ndim == 2:
        out = out.mean(axis=1, dtype=np.float32)
    return out


SAMPLE_SPEECH = Path(__file__).resolve().parent / "data" / "jfk.flac"
"""Real human speech shipped with the package (11 s, JFK: "And so my fellow Americans, ask not what your
country can do for you, ask what you can do for your country."), for demos and benchmarks."""


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] to int16 (clipped)."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int16)


class StreamResampler:
    """Stateful streaming resampler for float32 mono blocks.

    Between rates of an integer ratio (16 <-> 48 kHz, 24 -> 48 kHz: every rate on the audio path) it
    is a polyphase FIR (:class:`_Polyphase`): each block comes out whole, ``delay`` output samples
    (under 1 ms) late. soxr's stream API, used for other ratios, holds back up to 38 ms and releases
    it in bursts, which a real-time path must pad with that much silence: latency every turn and
    every barge-in would pay."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._soxr = None
        self._fir: _Polyphase | None = None
        self.delay = 0  # output samples a signal comes out late
        if in_rate != out_rate and (out_rate % in_rate == 0 or in_rate % out_rate == 0):
            self._fir = _Polyphase(max(1, out_rate // in_rate), max(1, in_rate // out_rate))
            self.delay = self._fir.delay
        elif in_rate != out_rate:
            import soxr

            self._soxr = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)

    def state(self) -> object:
        """What it remembers of the input so far (to go back to with :meth:`restore`: output taken
        back and made again must join what was kept without a step). None under soxr."""
        return None if self._fir is None else (self._fir.history.copy(), self._fir.skip)

    def restore(self, state: object) -> None:
        if self._fir is not None and state is not None:
            self._fir.history, self._fir.skip = state  # type: ignore[misc]

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        pcm = pcm.astype(np.float32, copy=False)
        if self._fir is not None:
            return self._fir(pcm, last)
        if self._soxr is None:
            return pcm
        return self._soxr.resample_chunk(pcm, last=last)


class _Polyphase:
    """Resampling by an integer factor up (``up``) or down (``down``): a Kaiser-windowed sinc
    (~80 dB stopband, passband to 90% of the lower Nyquist rate) applied at the higher rate, only
    where an output sample is needed."""

    TAPS_PER_CYCLE = 32  # filter length per ratio step: 64 taps for 2x, 96 for 3x

    def __init__(self, up: int, down: int) -> None:
        ratio = max(up, down)
        n = self.TAPS_PER_CYCLE * ratio + 1  # odd: a delay of whole samples at either rate
        k = np.arange(n) - (n - 1) / 2
        cutoff = 0.9 / ratio  # of the higher rate's Nyquist
        h = cutoff * np.sinc(cutoff * k) * np.kaiser(n, 8.0)
        h *= up / h.sum()  # unity gain (an upsampler's zeros take `up` times)
        self.up, self.down = up, down
        self.h = h.astype(np.float32)
        taps = -(-n // up)  # every phase padded to one length, so each gives one value per input sample
        self.phases = [np.pad(self.h[p::up], (0, taps - len(self.h[p::up]))) for p in range(up)]
        self.history = np.zeros(taps - 1, np.float32)
        self.skip = 0  # (down) high-rate samples to pass before the next output sample
        self.delay = (n - 1) // 2 // down  # in output samples

    def __call__(self, x: np.ndarray, last: bool) -> np.ndarray:
        if last:
            x = np.concatenate([x, np.zeros(self.delay * self.down // self.up, np.float32)])  # the tail held back
        xx = np.concatenate([self.history, x])
        self.history = xx[len(xx) - len(self.history):] if len(self.history) else xx[:0]
        if len(x) == 0:
            return np.zeros(0, np.float32)
        if self.up > 1:
            out = np.empty(len(x) * self.up, np.float32)
            for p, h in enumerate(self.phases):
                out[p::self.up] = np.convolve(xx, h, "valid")
            return out
        full = np.convolve(xx, self.phases[0], "valid")  # one value per input sample
        picked = full[self.skip::self.down]
        self.skip = (self.skip - len(full)) % self.down
        return picked.astype(np.float32, copy=False)


def resample(pcm: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Resample a whole signal (offline)."""
    if in_rate == out_rate:
        return pcm.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(pcm.astype(np.float32, copy=False), in_rate, out_rate, quality="HQ").astype(np.float32)


def read_audio(path: str | Path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 mono, optionally resampled. Clear errors for missing/bad files."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioFormatError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own LibsndfileError
        raise AudioFormatError(f"cannot read {path} as audio ({exc}); use WAV, FLAC or OGG") from exc
    if data.shape[0] == 0:
        raise AudioFormatError(f"{path} holds no audio samples")
    mono = to_mono_float(data, rate)
    if sample_rate is not None and sample_rate != rate:
        mono, rate = resample(mono, rate, sample_rate), sample_rate
    return mono, rate


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write float32 mono as 16-bit PCM WAV."""
    import soundfile as sf

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), to_int16(pcm), sample_rate, subtype="PCM_16")


def espeak(text: str, sample_rate: int = 16_000, voice: str = "en-us", words_per_minute: int = 160) -> np.ndarray:
    """Synthetic speech with known text from espeak-ng (for tests and benchmarks), float32 mono."""
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise AudioFormatError("espeak-ng is not installed; apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", str(path), text],
                       check=True, capture_output=True)
        return read_audio(path, sample_rate)[0]
