"""``duplex bench tts``: first-packet latency and real-time factor of the streaming TTS.

Runs on the full-size CSM-1B + Mimi with random weights by default (``--profile random``): speed
does not depend on the weight values, and every segment is held to a fixed number of frames so it
does not depend on when generation would stop either. For each chunk size (codec frames per decode
call) it speaks one reply through the same streaming path a session uses, its text streamed word by
word as from an LLM (so it is spoken as a short first segment, then the rest), and measures:

- first packet: text in (the first word available) to the first audio chunk out;
- RTF: wall time of the whole reply / seconds of audio it holds (below 1 = faster than real time);
- ms per frame: the reply's wall time per codec frame (generation and decoding);
- a breakdown of a frame's time: backbone (incl. the text prefill, spread over the frames), depth
  decoder (the other codebooks, sampled one by one), codec decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator

TEXT = "Hello there, this is a benchmark of the streaming speech synthesizer reading one sentence aloud."
CHUNKS = (1, 2, 4)


async def _text(text: str) -> AsyncIterator[str]:
    for index, word in enumerate(text.split()):
        yield word if index == 0 else " " + word
        await asyncio.sleep(0)


async def _reply(tts, text: str) -> tuple[float, float, int]:
    """(first chunk s, total s, samples) of one reply on a fresh stream."""
    stream = tts.new_stream()
    samples, first = 0, None
    start = time.perf_counter()
    async for chunk in stream.synthesize(_text(text)):
        if first is None and len(chunk.pcm):
            first = time.perf_counter() - start
        samples += len(chunk.pcm)
    total = time.perf_counter() - start
    await stream.aclose()
    return first or total, total, samples


def run(args: argparse.Namespace) -> dict:
    from duplex.config import AgentConfig
    from duplex.errors import ConfigError
    from duplex.tts.profiles import load_engine
    from duplex.tts.stream import CsmTTS, TTSSettings
    from duplex.tts.voice import load_voice

    if args.profile == "fake":
        raise ConfigError("the TTS benchmark needs a real profile: random (default), tiny or pretrained")
    config = AgentConfig(profile=args.profile, device=args.device, tts_model=args.tts_model, voice=args.voice,
                         voice_text=args.voice_text, seed=args.seed).validate()
    device = config.resolved_device()
    frames = 6 if args.quick else 40  # per reply: two segments of frames // 2
    repeats = 1 if args.quick else 2
    voice = load_voice(config.voice, config.voice_text) if config.voice else None
    t0 = time.perf_counter()
    engine = load_engine(config, device)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in engine.model.parameters())
    first_text = TEXT.split(",")[0] + ","
    prompt_tokens = [len(engine.text_ids(t)) for t in (first_text, TEXT[len(first_text) + 1:])]
    print(f"TTS {args.profile} on {device}: {params / 1e6:.0f} M parameters ({load_s:.1f} s to load); "
          f"{frames} frames per reply ({frames / engine.frame_rate:.2f} s of audio) in 2 segments of "
          f"{prompt_tokens} text tokens, {repeats} repeat(s); voice prompt: {'yes' if voice else 'no'}")
    print(f"{'chunk':>5} {'first packet ms':>16} {'RTF':>6} {'ms/frame':>9}")

    async def measure() -> tuple[dict, dict]:
        warm = CsmTTS(engine, device=device, voice=voice, settings=TTSSettings(seed=config.seed, fixed_frames=2))
        try:  # warm-up: first-call costs (allocations, kernels) and the voice prompt's cached prefix
            await _reply(warm, TEXT)
        finally:
            await warm.aclose()
        figures: dict[str, dict[str, float]] = {}
        for chunk in CHUNKS:
            tts = CsmTTS(engine, device=device,
                         settings=TTSSettings(chunk_frames=chunk, seed=config.seed, fixed_frames=frames // 2))
            tts.voice = warm.voice  # encoded once, prefix cached
            try:
                runs = [await _reply(tts, TEXT) for _ in range(repeats)]
            finally:
                await tts.aclose()
            first = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            samples = runs[0][2]
            if samples != frames * engine.frame_size:
                raise RuntimeError(f"expected {frames} frames of audio, got {samples / engine.frame_size:.1f}")
            audio_s = samples / engine.sample_rate
            row = {"first_packet_ms": round(first * 1000, 1), "rtf": round(total / audio_s, 3),
                   "ms_per_frame": round(total * 1000 / frames, 1)}
            figures[str(chunk)] = row
            print(f"{chunk:>5} {row['first_packet_ms']:>16.1f} {row['rtf']:>6.2f} {row['ms_per_frame']:>9.1f}",
                  flush=True)
        # where a frame's time goes (synchronised per stage on a GPU, so run apart from the figures above)
        tts = CsmTTS(engine, device=device, settings=TTSSettings(chunk_frames=2, seed=config.seed,
                                                                 fixed_frames=frames // 2))
        tts.voice = warm.voice
        engine.stage_seconds = {}
        try:
            await _reply(tts, TEXT)
        finally:
            stages, engine.stage_seconds = engine.stage_seconds, None
            await tts.aclose()
        breakdown = {f"{stage}_ms_per_frame": round(seconds * 1000 / frames, 1) for stage, seconds in stages.items()}
        print("per frame (chunk 2): " + ", ".join(f"{k.split('_')[0]} {v:.1f} ms" for k, v in breakdown.items()))
        return figures, breakdown

    figures, breakdown = asyncio.run(measure())
    return {"device": device, "profile": args.profile, "frames_per_reply": frames, "repeats": repeats,
            "segment_text_tokens": prompt_tokens,
            "voice_prompt": voice is not None, "parameters_m": round(params / 1e6, 1), "load_s": round(load_s, 1),
            "chunk_frames": figures, "breakdown_chunk_2": breakdown}
