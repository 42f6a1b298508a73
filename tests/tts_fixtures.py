"""Shared fixtures of the TTS tests: the tiny CSM + Mimi (built once under cache_dir(), saved and loaded
back through the real loader), TTS factories on it, voice clips cut from JFK, and stream helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator

import numpy as np
import pytest

from duplex.stages import AudioChunk, VoicePrompt

# JFK (tests/conftest.py): two clips of different words, each with its transcript.
VOICE_A = (0.0, 4.5, "And so my fellow Americans, ask not")
VOICE_B = (5.2, 10.8, "what your country can do for you, ask what you can do for your country.")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are so small that a second intra-op thread only adds sync cost (several times
    slower on a busy 2-core machine): TTS test modules run on one torch thread, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tts_checkpoint():
    """(model, tokenizer) of the tiny CSM + Mimi, loaded through duplex.tts.loading.load_checkpoint."""
    import torch

    from duplex.tts.loading import load_checkpoint, tiny_checkpoint

    torch.set_grad_enabled(False)
    return load_checkpoint(tiny_checkpoint(), "cpu")


@pytest.fixture(scope="session")
def tiny_codec(tiny_tts_checkpoint):
    return tiny_tts_checkpoint[0].codec_model


@pytest.fixture(scope="session")
def make_engine(tiny_tts_checkpoint):
    """``make_engine(**kwargs) -> CsmEngine`` on the tiny checkpoint (engines share the weights)."""
    from duplex.tts.engine import CsmEngine

    def make(**kwargs):
        model, tokenizer = tiny_tts_checkpoint
        kwargs.setdefault("slots", 16)
        return CsmEngine(model, tokenizer, **kwargs)

    return make


@pytest.fixture
def make_tts(make_engine) -> Iterator:
    """``make_tts(voice=None, engine=None, **settings) -> CsmTTS`` on the tiny model; workers closed after."""
    from duplex.tts.stream import CsmTTS, TTSSettings

    made = []

    def make(voice: VoicePrompt | None = None, engine=None, **settings):
        # the frame run ahead as on a GPU (the agent runs it only there): every TTS test covers it
        tts = CsmTTS(engine or make_engine(), settings=TTSSettings(**settings), voice=voice, ahead=True)
        made.append(tts)
        return tts

    yield make
    for tts in made:
        tts.close()


@pytest.fixture(scope="session")
def jfk24(jfk_path) -> np.ndarray:
    from duplex.audio import read_audio

    return read_audio(jfk_path, 24_000)[0]


def clip(jfk24: np.ndarray, spec: tuple[float, float, str]) -> VoicePrompt:
    start, end, text = spec
    return VoicePrompt(pcm=jfk24[int(start * 24_000):int(end * 24_000)].copy(), sample_rate=24_000, text=text)


@pytest.fixture(scope="session")
def voice_a(jfk24) -> VoicePrompt:
    return clip(jfk24, VOICE_A)


@pytest.fixture(scope="session")
def voice_b(jfk24) -> VoicePrompt:
    return clip(jfk24, VOICE_B)


async def pieces(text: str, size: int = 3) -> AsyncIterator[str]:
    """``text`` in pieces of ``size`` characters, cutting through words, as an LLM streams tokens (giving
    the event loop a turn between pieces, as a real source does)."""
    for i in range(0, len(text), size):
        yield text[i:i + size]
        await asyncio.sleep(0)


async def collect(stream, text: str | Iterable[str]) -> list[AudioChunk]:
    source = pieces(text) if isinstance(text, str) else _iter(text)
    return [chunk async for chunk in stream.synthesize(source)]


async def _iter(items: Iterable[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


def relative_error(a, b) -> float:
    """max |a - b| / max |b|."""
    import torch

    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())
