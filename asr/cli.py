"""``duplex transcribe FILE``: stream an audio file through the live ASR path and print what it hears.

The file is read, converted to 16 kHz mono and fed in ``--packet-ms`` packets exactly as a live
session would feed it (as fast as the model computes, not paced); partials and finals are printed as
they come, stamped with the stream time they depend on. At the end of the file the utterance is
closed as the VAD would close it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from duplex.errors import ConfigError
from duplex.events import INPUT_RATE, TranscriptFinal, TranscriptPartial


def _line(event: TranscriptPartial | TranscriptFinal) -> str:
    stamp = f"[{event.stream_s:7.2f}s]"
    if isinstance(event, TranscriptFinal):
        return f"{stamp} final:   {event.text}"
    tail = f" ~{event.unstable}" if event.unstable else ""
    return f"{stamp} partial: {event.stable}{tail}"


async def transcribe(model, pcm, packet: int, out=None) -> list[TranscriptFinal]:
    """Feed ``pcm`` (16 kHz float32) in ``packet``-sample packets; print events (to ``out``, default
    stdout); return the finals."""
    out = out or sys.stdout
    stream = model.new_stream()
    finals: list[TranscriptFinal] = []
    try:
        for start in range(0, len(pcm), packet):
            for event in await stream.feed(pcm[start:start + packet]):
                print(_line(event), file=out, flush=True)
                if isinstance(event, TranscriptFinal):
                    finals.append(event)
        for event in await stream.endpoint():
            print(_line(event), file=out, flush=True)
            finals.append(event)
    finally:
        await stream.aclose()
    return finals


def transcribe_main(args: argparse.Namespace) -> int:
    from duplex.audio import read_audio
    from duplex.cli import config_from_args

    if args.latency:
        args.asr_latency = args.latency
    if not 1 <= args.packet_ms <= 1000:
        raise ConfigError(f"--packet-ms must be between 1 and 1000, got {args.packet_ms}")
    config = config_from_args(args)
    pcm, _ = read_audio(args.input, INPUT_RATE)
    from duplex.asr.profiles import build_asr

    t0 = time.perf_counter()
    model = build_asr(config, config.resolved_device(), max_batch=1)
    left, right = model.context
    print(f"# {args.input}: {len(pcm) / INPUT_RATE:.2f} s; ASR {config.profile} on {model.device}, "
          f"context [{left},{right}] ({model.chunk_seconds * 1000:.0f} ms chunks), loaded in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        asyncio.run(_run(model, pcm, max(1, args.packet_ms * INPUT_RATE // 1000)))
    finally:
        model.close()
    elapsed = time.perf_counter() - t0
    print(f"# {elapsed:.2f} s for {len(pcm) / INPUT_RATE:.2f} s of audio (RTF {elapsed * INPUT_RATE / len(pcm):.3f})",
          file=sys.stderr)
    return 0


async def _run(model, pcm, packet: int) -> None:
    try:
        await transcribe(model, pcm, packet)
    finally:
        await model.aclose()
