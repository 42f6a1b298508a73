"""Voice prompts: a short reference clip and its transcript that set the agent's voice (zero-shot).

:func:`load_voice` reads a clip from a file (through :func:`duplex.audio.read_audio`) and
:func:`check_voice` validates a :class:`~duplex.stages.VoicePrompt` from any source, returning its
audio as float32 mono at the codec's rate. Bad clips are refused with a clear
:class:`~duplex.errors.AudioFormatError` (too long, too short, silent, not audio) and a missing
transcript with a :class:`~duplex.errors.ConfigError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duplex.audio import read_audio, resample, to_mono_float
from duplex.errors import AudioFormatError, ConfigError
from duplex.stages import VoicePrompt

MIN_SECONDS = 2.0
MAX_SECONDS = 20.0
SILENCE_RMS = 10 ** (-50 / 20)  # -50 dBFS: quieter than this over the whole clip is taken for silence
MAX_TEXT_CHARS = 600


def load_voice(path: str | Path, text: str | None) -> VoicePrompt:
    """Read and validate a voice clip file and its transcript."""
    pcm, rate = read_audio(path)  # AudioFormatError for missing or unreadable files
    prompt = VoicePrompt(pcm=pcm, sample_rate=rate, text=text or "")
    check_voice(prompt, source=str(path))
    return prompt


def check_voice(prompt: VoicePrompt, sample_rate: int = 24_000, *, source: str = "voice clip") -> np.ndarray:
    """Validate ``prompt``; return its audio as float32 mono at ``sample_rate``."""
    if not isinstance(prompt, VoicePrompt):
        raise AudioFormatError(f"a voice prompt must be a duplex.stages.VoicePrompt, got {type(prompt).__name__}")
    text = " ".join((prompt.text or "").split())
    if not text:
        raise ConfigError(f"{source}: a voice prompt needs the transcript of its clip (--voice-text)")
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"{source}: the transcript is {len(text)} characters; a {MAX_SECONDS:.0f} s clip "
                          f"holds at most about {MAX_TEXT_CHARS}; is it the right text?")
    pcm = np.asarray(prompt.pcm)
    if pcm.ndim == 0 or pcm.size == 0:
        raise AudioFormatError(f"{source}: the clip holds no audio samples")
    mono = to_mono_float(pcm, prompt.sample_rate)  # AudioFormatError for bad sample types, shapes and rates
    seconds = mono.shape[0] / prompt.sample_rate
    if seconds < MIN_SECONDS:
        raise AudioFormatError(f"{source}: the clip is {seconds:.2f} s long; a voice prompt needs "
                               f"{MIN_SECONDS:.0f} to {MAX_SECONDS:.0f} s of speech")
    if seconds > MAX_SECONDS:
        raise AudioFormatError(f"{source}: the clip is {seconds:.1f} s long; a voice prompt takes at most "
                               f"{MAX_SECONDS:.0f} s (cut it to a few sentences)")
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise AudioFormatError(f"{source}: the clip is silent (level {20 * np.log10(max(rms, 1e-12)):.0f} dBFS); "
                               "record the voice louder")
    if prompt.sample_rate != sample_rate:
        mono = resample(mono, prompt.sample_rate, sample_rate)
    return mono.astype(np.float32, copy=False)
