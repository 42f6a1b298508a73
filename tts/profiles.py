"""``build_tts``: the TTS model of each profile (tiny, random, pretrained), ready to speak.

- ``tiny``: a tiny random CSM + Mimi, built once, saved under the cache dir, loaded back like a real
  checkpoint;
- ``random``: full-size CSM-1B + Mimi with random weights (speed measurements);
- ``pretrained``: ``sesame/csm-1b`` (or ``config.tts_model``) from a local folder or the HF cache.

``config.tts_chunk_frames`` sets the codec frames per decode call, ``config.voice`` /
``config.voice_text`` the voice prompt, ``config.seed`` the sampling seed.
"""

from __future__ import annotations

from duplex.config import AgentConfig
from duplex.errors import ConfigError
from duplex.tts.loading import PRETRAINED_TTS

RANDOM_ARCHITECTURES = ("csm-1b", PRETRAINED_TTS)


def load_engine(config: AgentConfig, device: str):
    """The :class:`~duplex.tts.engine.CsmEngine` of ``config.profile`` on ``device`` (blocking)."""
    from duplex.tts import loading
    from duplex.tts.engine import CsmEngine

    if config.profile == "tiny":
        model, tokenizer = loading.load_checkpoint(loading.tiny_checkpoint(), device)
    elif config.profile == "random":
        if config.tts_model not in (None, *RANDOM_ARCHITECTURES):
            raise ConfigError(f"the random profile builds {RANDOM_ARCHITECTURES[0]} only, not {config.tts_model!r}")
        model, tokenizer = loading.build_random(device, seed=config.seed)
    elif config.profile == "pretrained":
        model, tokenizer = loading.load_pretrained(config.tts_model, device)
    else:
        raise ConfigError(f"no TTS model for profile {config.profile!r}")
    return CsmEngine(model, tokenizer, slots=config.slots(), graphs=config.graphs, compile=config.compile)


def build_tts(config: AgentConfig, device: str):
    """The TTS stage of ``config`` (blocking: call it off the event loop)."""
    from duplex.tts.stream import CsmTTS, TTSSettings
    from duplex.tts.voice import load_voice

    voice = load_voice(config.voice, config.voice_text) if config.voice else None  # fail fast on a bad clip
    settings = TTSSettings(chunk_frames=config.tts_chunk_frames, seed=config.seed)
    return CsmTTS(load_engine(config, device), device=device, settings=settings, voice=voice)


def pull(config: AgentConfig) -> str:
    """Fetch the pretrained checkpoint into the HF cache (for ``duplex models pull``); returns its path."""
    from huggingface_hub import snapshot_download

    return snapshot_download(config.tts_model or PRETRAINED_TTS)
