"""``duplex bench tts``: first audio, frame-step time and real-time factor of the streaming TTS, per batch size.

Runs on the full-size CSM-1B + Mimi with random weights by default (``--profile random``): speed
does not depend on the weight values, and every segment is held to a fixed number of frames so it
does not depend on when generation would stop either. Replies go through the same engine, scheduler
and streams a session uses, their text streamed word by word as from an LLM (so each is spoken as a
short first segment, then the rest).

- **chunk sizes** (codec frames per decode call), one reply at a time: first audio (text in to the
  first chunk out), RTF (wall time of the reply / seconds of audio) and ms per frame;
- **batches** (``--batch 1 8 32 64``): that many replies spoken at once, each tick one frame step
  for all of them plus one batched codec decode for the chunks due. Per batch size: ``step_ms``
  (median tick), frames per second for one reply and in aggregate, ``rtf`` (a tick over a frame's
  80 ms of audio: each stream keeps real time while it is below 1) and ``first_audio_ms``: how long
  a new reply waits for its first chunk while the others speak. On a GPU with graphs captured,
  every batch size is measured both ways (``*_eager`` keys), and ``captured_equals_eager`` says
  whether the graph replays made exactly the audio the eager steps made (same seeds, same draws);
- a breakdown of an eager frame (one reply): backbone, depth decoder, codec decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import numpy as np

TEXT = "Hello there, this is a benchmark of the streaming speech synthesizer reading one sentence aloud."
CHUNKS = (1, 2, 4)


async def _text(text: str) -> AsyncIterator[str]:
    for index, word in enumerate(text.split()):
        yield word if index == 0 else " " + word
        await asyncio.sleep(0)


async def _reply(tts, text: str, started: asyncio.Event | None = None) -> tuple[float, float, int, np.ndarray]:
    """(first chunk s, total s, samples, the audio) of one reply on a fresh stream."""
    stream = tts.new_stream()
    pcm: list[np.ndarray] = []
    first = None
    start = time.perf_counter()
    async for chunk in stream.synthesize(_text(text)):
        if first is None and len(chunk.pcm):
            first = time.perf_counter() - start
            if started is not None:
                started.set()
        pcm.append(chunk.pcm)
    total = time.perf_counter() - start
    await stream.aclose()
    audio = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
    return first or total, total, audio.size, audio


def run(args: argparse.Namespace) -> dict:
    import torch

    from duplex.config import AgentConfig
    from duplex.engine import fusion
    from duplex.engine.roofline import floor_fraction
    from duplex.errors import ConfigError
    from duplex.tts.profiles import load_engine
    from duplex.tts.stream import CsmTTS, TTSSettings
    from duplex.tts.voice import load_voice

    if args.profile == "fake":
        raise ConfigError("the TTS benchmark needs a real profile: random (default), tiny or pretrained")
    quick = args.quick or args.profile == "tiny"
    batches = tuple(getattr(args, "batch", None) or ((1, 8) if quick else (1, 8, 32, 64)))
    config = AgentConfig(profile=args.profile, device=args.device, tts_model=args.tts_model, voice=args.voice,
                         voice_text=args.voice_text, seed=args.seed, engine_slots=max(batches) + 1,
                         graphs=getattr(args, "graphs", True), compile=getattr(args, "compile", False)).validate()
    device = config.resolved_device()
    if device == "cpu" and args.profile == "tiny":
        torch.set_num_threads(1)  # tiny ops: a second intra-op thread only adds sync cost
    frames = 12 if quick else 40  # per reply: two segments of frames // 2
    repeats = 1 if quick else 2
    voice = load_voice(config.voice, config.voice_text) if config.voice else None
    t0 = time.perf_counter()
    engine = load_engine(config, device)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in engine.model.parameters())
    first_text = TEXT.split(",")[0] + ","
    prompt_tokens = [len(engine.text_ids(t)) for t in (first_text, TEXT[len(first_text) + 1:])]
    print(f"TTS {args.profile} on {device}: {params / 1e6:.0f} M parameters ({load_s:.1f} s to load); "
          f"{frames} frames per reply ({frames / engine.frame_rate:.2f} s of audio) in 2 segments of "
          f"{prompt_tokens} text tokens, {repeats} repeat(s); voice prompt: {'yes' if voice else 'no'}; "
          f"batches {list(batches)}; graphs {config.graphs}")
    tts = CsmTTS(engine, device=device, voice=voice, settings=TTSSettings(seed=config.seed, fixed_frames=2))

    async def measure() -> dict:
        t = time.perf_counter()
        await tts.warm_up(lambda line: print(f"  ({line})", flush=True))
        capture_s = time.perf_counter() - t
        agree = {}
        if engine.graphs.compiled:  # the fused layers compute what the plain ones do (up to rounding)
            agree = {"fused_vs_unfused_rel_err": {
                "backbone": await tts.scheduler.run(fusion.agreement, engine.backbone, engine.kv),
                "depth": await tts.scheduler.run(fusion.agreement, engine.depth, engine.depth_kv, 4)}}
            print(f"  fused layers vs unfused: relative difference {agree['fused_vs_unfused_rel_err']}", flush=True)
        await _reply(tts, TEXT)  # warm-up: first-call costs and the voice prompt's cached prefix
        print(f"{'chunk':>5} {'first audio ms':>15} {'RTF':>6} {'ms/frame':>9}")
        chunks: dict[str, dict[str, float]] = {}
        for chunk in CHUNKS:
            tts.settings = TTSSettings(chunk_frames=chunk, seed=config.seed, fixed_frames=frames // 2)
            runs = [await _reply(tts, TEXT) for _ in range(repeats)]
            first = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            samples = runs[0][2]
            if samples != frames * engine.frame_size:
                raise RuntimeError(f"expected {frames} frames of audio, got {samples / engine.frame_size:.1f}")
            audio_s = samples / engine.sample_rate
            row = {"first_audio_ms": round(first * 1000, 1), "rtf": round(total / audio_s, 3),
                   "ms_per_frame": round(total * 1000 / frames, 1)}
            chunks[str(chunk)] = row
            print(f"{chunk:>5} {row['first_audio_ms']:>15.1f} {row['rtf']:>6.2f} {row['ms_per_frame']:>9.1f}",
                  flush=True)
        tts.settings = TTSSettings(chunk_frames=2, seed=config.seed, fixed_frames=frames // 2)
        rows = []
        for b in batches:
            row, audio = await _batch(tts, b, frames)
            row["ops_per_step"] = await tts.scheduler.run(engine.ops_per_step, b)
            # the replies here are short: their frames attend over the shortest length bucket
            row["floor_fraction"] = floor_fraction(engine.step_bytes(b, engine.graphs.lengths[0]),
                                                   row["step_ms"] / 1e3, device)
            if engine.graphs.captured:  # the same, eager, side by side
                engine.graphs.eager = True
                try:
                    eager, eager_audio = await _batch(tts, b, frames)
                finally:
                    engine.graphs.eager = False
                row.update({f"{k}_eager": v for k, v in eager.items() if k != "batch"})
                # same seeds, same draws: the graph replays must make exactly the eager steps' audio
                row["captured_equals_eager"] = all(np.array_equal(a, e) for a, e in zip(audio, eager_audio))
            rows.append(row)
            floor = "" if row["floor_fraction"] is None else f", {100 * row['floor_fraction']:.0f}% of the floor"
            print(f"  batch {b:>3}: step {row['step_ms']:.2f} ms, {row['per_session_per_s']:.1f} frames/s per "
                  f"reply, {row['aggregate_per_s']:.0f} frames/s in all, RTF {row['rtf']:.3f}{floor}, first audio "
                  f"{row['first_audio_ms']:.1f} ms, {row['ops_per_step']} eager ops" + (f" (eager: step {row['step_ms_eager']:.2f} ms, RTF "
                                                        f"{row['rtf_eager']:.3f}; audio "
                                                        f"{'equal' if row['captured_equals_eager'] else 'DIFFERS'})"
                                                        if "step_ms_eager" in row else ""),
                  flush=True)
        # where an eager frame's time goes (synchronised per stage on a GPU, so run apart from the rest)
        engine.graphs.eager, engine.stage_seconds = True, {}
        try:
            made = engine.frames_generated
            await _reply(tts, TEXT)
            made = engine.frames_generated - made
        finally:
            stages, engine.stage_seconds, engine.graphs.eager = engine.stage_seconds, None, False
        breakdown = {f"{stage}_ms_per_frame": round(seconds * 1000 / max(made, 1), 2)
                     for stage, seconds in stages.items()}
        print("per eager frame (chunk 2): " + ", ".join(f"{k.split('_')[0]} {v:.2f} ms" for k, v in breakdown.items()))
        return {"chunk_frames": chunks, "batches": rows, "breakdown_eager_chunk_2": breakdown,
                "graphs_captured": engine.graphs.captured, "compiled": engine.graphs.compiled, **agree,
                "capture_s": round(capture_s, 2), "ops_per_step": rows[0]["ops_per_step"] if rows else None,
                "layers": {"backbone": len(engine.backbone.layers), "depth": len(engine.depth.layers),
                           "codebooks": engine.num_codebooks}}

    try:
        figures = asyncio.run(measure())
    finally:
        tts.close()
    b1 = next((r for r in figures["batches"] if r["batch"] == 1), None)
    if b1:
        for r in figures["batches"]:
            if r["batch"] > 1:
                print(f"  batch {r['batch']} aggregate = x{r['aggregate_per_s'] / b1['aggregate_per_s']:.1f} batch 1")
    return {"device": device, "profile": args.profile, "frames_per_reply": frames, "repeats": repeats,
            "segment_text_tokens": prompt_tokens, "voice_prompt": voice is not None,
            "parameters_m": round(params / 1e6, 1), "load_s": round(load_s, 1), **figures}


async def _batch(tts, b: int, frames: int) -> tuple[dict, list[np.ndarray]]:
    """``b`` replies spoken at once; then one more starts while they speak. Returns the figures and
    the ``b`` replies' audio."""
    scheduler = tts.scheduler
    frame_ms = 1000.0 / tts.engine.frame_rate
    speaking = asyncio.Event()
    n0 = scheduler.ticks
    start = time.perf_counter()
    tasks = [asyncio.create_task(_reply(tts, TEXT, speaking)) for _ in range(b)]
    await speaking.wait()
    joiner = asyncio.create_task(_reply(tts, TEXT))
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    first_join = (await joiner)[0]
    ticks = [t for t in scheduler.ticks_since(n0) if t.rows]
    # steady state: every reply in the step, no job (a new segment's prefill) beside it
    full = [t.seconds for t in ticks if t.rows >= b and not t.jobs] or [t.seconds for t in ticks]
    step_s = statistics.median(full)
    made = sum(t.rows for t in ticks)
    if any(r[2] != frames * tts.engine.frame_size for r in results):
        raise RuntimeError("a reply made the wrong number of frames")
    return {"batch": b, "step_ms": round(step_s * 1e3, 3), "per_session_per_s": round(1.0 / step_s, 2),
            "aggregate_per_s": round(b / step_s, 1), "rtf": round(step_s * 1e3 / frame_ms, 4),
            "wall_rtf": round(elapsed / (frames * frame_ms / 1e3), 3), "frames_made": made,
            "first_audio_ms": round(first_join * 1e3, 1)}, [r[3] for r in results]
