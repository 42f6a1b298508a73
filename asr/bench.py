"""``duplex bench asr``: the cost of a stream step per latency setting, alone and batched.

For each attention context it measures, on the model of ``--profile`` (default ``random``: the
full-size FastConformer large architecture with random weights; speed does not depend on the weight
values, except that greedy decoding costs one joint + prediction step per label: the random model's
blank bias is tuned at each context for about 0.3 labels per 80 ms frame over the benchmark audio,
as speech gives, though random weights emit them in bursts, and the rate actually decoded is printed
as ``lab/fr``):

- ``step_ms[b]``: one batched stream step (exact log-mel of the chunk, subsampling, 17 conformer
  layers with caches, greedy decoding; on a GPU the steady chunk is one captured graph unless
  ``--no-graphs``) for ``b`` sessions at once, ``b`` in 1/8/32 (1/8 with
  ``--quick``): the median over every chunk of 6 s of audio (2 s with ``--quick``), on the ASR
  worker thread as in a live session;
- ``rtf``: step time over chunk duration at batch 1 (below 1: faster than real time);
- ``rt_streams[b]``: streams one worker keeps in real time when it batches ``b`` at a time
  (``b * chunk / step``; fewer than ``b`` means batch ``b`` is not real time);
- ``live_rtf``: the whole live path at batch 1 (20 ms packets through ``ASRSession.feed``, event loop,
  worker thread), wall time over audio time;
- ``nemo_step_ms`` / ``nemo_rtf``: NeMo's own ``conformer_stream_step`` on the same chunk (features
  computed beforehand, as NeMo's streaming buffer does), for reference;
- ``ops_per_step`` / ``layers``: the kernels one steady step launches as a GPU captures it (its fixed
  number of label steps; ``StreamingASR.ops_per_step``, the count the kernel-budget test holds)
  and the conformer layers they run through;
- ``flush_ms`` / ``flush_eager_ms`` / ``flush_frames`` / ``flush_ops`` (``flush``): an endpoint's flush
  of a stream half a chunk past its last one (the encoder frames it holds), captured (one replay; None
  where not captured: the CPU, ``--no-graphs``) and eager, median ms, and the kernels of the captured
  one (counted eagerly, on the CPU too);
- ``redecoded`` (``again``): the share of the captured steady steps whose chunk emitted more labels
  than their label steps make room for, so that the second captured step decoded it again (None
  and ``-`` where no step was captured: the CPU, ``--no-graphs``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

CONTEXTS = [(70, 0), (70, 1), (70, 6), (70, 13)]
QUICK_CONTEXTS = [(70, 1), (70, 6)]


def run(args: argparse.Namespace) -> dict:
    from duplex.cli import config_from_args

    config = config_from_args(args)
    device = config.resolved_device()
    quick = bool(getattr(args, "quick", False))
    contexts = QUICK_CONTEXTS if quick else CONTEXTS
    batches = (1, 8) if quick else (1, 8, 32)
    seconds = 2.0 if quick else 6.0  # audio stepped through per measurement

    import torch

    from duplex.asr.profiles import load_model

    t0 = time.perf_counter()
    model = load_model(config, device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"ASR {config.profile}: {type(model).__name__}, {params:.1f}M parameters, {device}, "
          f"{torch.get_num_threads()} torch threads (built in {time.perf_counter() - t0:.0f} s)")
    header = (f"{'context':>8} {'chunk':>7} " + " ".join(f"{'step@' + str(b):>9}" for b in batches)
              + f" {'RTF@1':>6} {'live':>6} " + " ".join(f"{'rt@' + str(b):>6}" for b in batches)
              + f" {'nemo':>9} {'nemoRTF':>7} {'lab/fr':>6} {'ops':>6} {'again':>6}  flush (captured/eager)")
    print(header)
    rows: dict[str, dict] = {}
    for context in contexts:
        rows["[%d,%d]" % context] = row = _measure(model, context, device, batches, seconds,
                                                  tune=config.profile == "random", graphs=config.graphs)
        print(f"{'[%d,%d]' % context:>8} {row['chunk_ms']:>5.0f}ms "
              + " ".join(f"{row['step_ms'][b]:>7.1f}ms" for b in batches)
              + f" {row['rtf']:>6.3f} {row['live_rtf']:>6.3f} "
              + " ".join(f"{row['rt_streams'][b]:>6.1f}" for b in batches)
              + f" {row['nemo_step_ms']:>7.1f}ms {row['nemo_rtf']:>7.3f} {row['labels_per_frame']:>6.2f}"
              + f" {row['ops_per_step']:>6} {_share(row['redecoded'])} {_flush(row)}", flush=True)
    return {"device": device, "model": type(model).__name__, "params_m": round(params, 1),
            "torch_threads": torch.get_num_threads(), "contexts": rows}


def _flush(row: dict) -> str:
    """The flush column: its frames, the captured and eager times, the captured kernels."""
    captured = "-" if row["flush_ms"] is None else f"{row['flush_ms']:.1f}"
    return (f"{row['flush_frames']} fr {captured}/{row['flush_eager_ms']:.1f} ms"
            + ("" if row["flush_ops"] is None else f", {row['flush_ops']} kernels captured"))


def _share(part: float | None) -> str:
    return f"{'-':>6}" if part is None else f"{100 * part:>5.1f}%"


def _audio(seconds: float):
    """Speech-like signal for the benchmark (speed does not depend on it, the label rate a little)."""
    import numpy as np

    from duplex.asr.synthetic import calibration_audio

    clip = calibration_audio()
    reps = int(seconds * 16000 / clip.size) + 1
    return np.tile(clip, reps)[: int(seconds * 16000)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _measure(model, context, device: str, batches, seconds: float, tune: bool, graphs: bool) -> dict:
    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(model, context=context, device=device, max_batch=max(batches), graphs=graphs)
    try:
        return asyncio.run(_measure_on_worker(asr, model, context, device, batches, seconds, tune))
    finally:
        asr.close()


async def _measure_on_worker(asr, model, context, device: str, batches, seconds: float, tune: bool) -> dict:
    """Every measurement runs on the ASR worker thread, where live steps run: one thread's torch
    (OpenMP) workers, not two teams spinning against each other on a small CPU."""
    run = asr._batch.worker.run
    if tune:
        from duplex.asr.synthetic import tune_label_rate

        await run(tune_label_rate, model)
    await asr.warm_up()  # the steady step captured per batch bucket (CUDA graphs; nothing on the CPU)
    ops = await run(asr.ops_per_step, 1)  # kernels of the captured step (eager count; the budget test's)
    chunk_s = asr.chunk_seconds
    steps = max(3, round(seconds / chunk_s))  # every chunk of the clip: its label rate is the tuned one
    audio = _audio(chunk_s * (steps + 2) + 1.0)
    step_ms, labels, frames = {}, 0, 0
    asr.steady_steps = asr.redecoded = 0
    for b in batches:
        times, n_labels, n_frames = await run(_timed_steps, asr, b, audio, steps, device)
        step_ms[b] = 1000 * statistics.median(times)
        labels, frames = labels + n_labels, frames + n_frames
    live_rtf = await _live(asr, audio[: int(16000 * seconds)])
    flush = await run(_flush_ms, asr, audio, device, 5 if len(batches) < 3 else 10)
    try:  # a reference only: NeMo's own step must not sink the benchmark (say, in bf16 on a GPU)
        nemo_ms = await run(_nemo_step_ms, model, context, audio, steps)
    except Exception as exc:  # noqa: BLE001
        print(f"(NeMo's conformer_stream_step failed at [{context[0]},{context[1]}]: {type(exc).__name__}: {exc})")
        nemo_ms = float("nan")
    await asr.aclose()
    return {
        "chunk_ms": 1000 * chunk_s,
        "step_ms": step_ms,
        "rtf": step_ms[1] / 1000 / chunk_s,
        "rt_streams": {b: b * chunk_s / (step_ms[b] / 1000) for b in batches},
        "live_rtf": live_rtf,
        "nemo_step_ms": nemo_ms,
        "nemo_rtf": nemo_ms / 1000 / chunk_s,
        "labels_per_frame": labels / max(frames, 1),
        "ops_per_step": ops,
        "redecoded": asr.redecoded / asr.steady_steps if asr.steady_steps else None,
        **flush,
        "layers": len(model.encoder.layers),
    }


def _timed_steps(asr, batch: int, audio, steps: int, device: str) -> tuple[list[float], int, int]:
    """Seconds of each of ``steps`` batched steps of ``batch`` fresh sessions, labels and frames."""
    from duplex.asr.streaming import SessionState

    states = [SessionState(slot=i) for i in range(batch)]
    for s in states:
        s.audio.append(audio)
    asr._step(states)  # the first chunk warms up (allocations, caches)
    times, labels, frames = [], 0, 0
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        results = asr._step(states)
        _sync(device)
        times.append(time.perf_counter() - t0)
        labels += sum(len(r.tokens) for r in results)
        frames += len(results) * asr.plan.out
    return times, labels, frames


def _flush_ms(asr, audio, device: str, reps: int) -> dict:
    """An endpoint's flush (the audio after a stream's last chunk, encoded provisionally and decoded)
    of a stream three chunks in and half a chunk more: its encoder frames (``flush_frames``), the
    median time of ``reps`` flushes captured (``flush_ms``; None where the flush is not captured) and
    eager (``flush_eager_ms``), and the kernels of the captured one (``flush_ops``)."""
    from duplex.asr.streaming import SessionState

    state = SessionState(slot=0)
    state.audio.append(audio[:asr.spec.samples_needed(asr.plan.mel_for_chunks(4)) + int(8000 * asr.chunk_seconds)])
    while asr.chunk_ready(state):
        asr._step([state])
    skip = state.skip_until
    pending = asr.spec.offline_frames(state.audio.fed) - state.n_mel
    frames = asr._subsample([state], asr._new_mel([state], [pending]))[0][0].size(0)  # what the flush encodes

    def median_ms(eager: bool) -> float:
        asr.flushes.eager, times = eager, []
        for _ in range(reps):
            state.skip_until = skip  # the same frames each time (a flush marks them done)
            _sync(device)
            t0 = time.perf_counter()
            asr._flush(state)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    try:
        eager_ms = median_ms(True)
        captured_ms = median_ms(False) if asr.flushes.captured else None
    finally:
        asr.flushes.eager = False
    captured = frames in asr.flushes.lengths
    return {"flush_frames": frames, "flush_ms": captured_ms, "flush_eager_ms": eager_ms,
            "flush_ops": asr.ops_per_flush(frames) if captured else None}


async def _live(asr, audio) -> float:
    """Wall time over audio time for one session fed 20 ms packets through the async path."""
    stream = asr.new_stream()
    t0 = time.perf_counter()
    for i in range(0, audio.size, 320):
        await stream.feed(audio[i:i + 320])
    elapsed = time.perf_counter() - t0
    await stream.aclose()
    return elapsed / (audio.size / 16000)


def _nemo_step_ms(model, context, audio, reps: int) -> float:
    """Median time of NeMo's ``conformer_stream_step`` (batch 1) over later chunks of ``audio``."""
    import torch

    from duplex.asr.encoder import select_context

    plan = select_context(model, context)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        x = torch.from_numpy(audio)[None].to(device)
        mel, _ = model.preprocessor(input_signal=x, length=torch.tensor([audio.size], device=device))
        mel = mel.to(dtype)
        cache = model.encoder.get_initial_cache_state(batch_size=1, dtype=dtype, device=device)
        hyps, times, pos = None, [], plan.first_mel + 2 * plan.mel  # later chunks: a full pre-encode cache
        for i in range(min(reps + 2, (mel.size(2) - pos) // plan.mel)):
            chunk = mel[:, :, pos - plan.pre_cache: pos + plan.mel]
            pos += plan.mel
            _sync(str(device))
            t0 = time.perf_counter()
            out = model.conformer_stream_step(
                processed_signal=chunk, processed_signal_length=torch.tensor([chunk.size(2)], device=device),
                cache_last_channel=cache[0], cache_last_time=cache[1], cache_last_channel_len=cache[2],
                keep_all_outputs=False, previous_hypotheses=hyps, drop_extra_pre_encoded=plan.drop,
                return_transcription=True)
            _sync(str(device))
            if i >= 2:
                times.append(time.perf_counter() - t0)
            cache = out[2:5]
            hyps = out[5] if out[5] is not None else None
    return 1000 * statistics.median(times)
