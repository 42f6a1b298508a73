"""``duplex say "text" --out file.wav``: speak text through the streaming TTS path into a WAV file.

The text goes in word by word, as an LLM would stream it, through the same segmenting, frame-by-frame
generation and chunked decoding a live session uses; the chunks are written as they come.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np


async def _pieces(text: str) -> AsyncIterator[str]:
    for index, word in enumerate(text.split()):
        yield word if index == 0 else " " + word


async def speak(tts, text: str) -> tuple[np.ndarray, list, float | None]:
    """Stream ``text`` through a fresh stream of ``tts``: audio, words and first-chunk latency (s)."""
    stream = tts.new_stream()
    chunks, words, first = [], [], None
    start = time.perf_counter()
    try:
        async for chunk in stream.synthesize(_pieces(text)):
            if first is None:
                first = time.perf_counter() - start
            chunks.append(chunk.pcm)
            words.extend(chunk.words)
    finally:
        await stream.aclose()
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return pcm, words, first


def say_main(args: argparse.Namespace) -> int:
    from duplex.audio import write_wav
    from duplex.cli import config_from_args
    from duplex.errors import ConfigError
    from duplex.tts.profiles import build_tts

    text = " ".join(args.text.split())
    if not text:
        raise ConfigError("nothing to say: the text is empty")
    config = config_from_args(args)
    if config.profile == "fake":
        raise ConfigError("duplex say needs a real TTS profile: pretrained, tiny or random")
    tts = build_tts(config, config.resolved_device())

    async def run():
        try:
            return await speak(tts, text)
        finally:
            await tts.aclose()

    start = time.perf_counter()
    pcm, words, first = asyncio.run(run())
    elapsed = time.perf_counter() - start
    write_wav(args.out, pcm, tts.sample_rate)
    seconds = len(pcm) / tts.sample_rate
    print(f"wrote {args.out}: {seconds:.2f} s of audio, {len(words)} words, first chunk after "
          f"{(first or 0) * 1000:.0f} ms, {elapsed:.2f} s to make (RTF {elapsed / max(seconds, 1e-9):.2f})")
    return 0
