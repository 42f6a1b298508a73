"""Time one eager step of the tiny engines on this machine: the TTS frame step (backbone, every depth
step, every draw, the codec's decode) and the LLM decode step, at batch 1 and 8, with the kernels each
launches. The fastest of ``--steps`` calls is printed (on a shared CPU the minimum is the figure
least moved by other work); compare revisions by running this in alternation, one process each.
``--codec`` times the frame step's codec decode instead, on the full-size Mimi (random weights, its
250-position attention window full), at batch 1, 8 and 32; ``--asr`` the ASR's steady step on the
full-size FastConformer (random weights, two torch threads), at contexts [70,0] and [70,6], batch 1
and 8; ``--flush`` counts the kernels of an endpoint's flush on that model at [70,6], eager against
captured, over the speech of duplex/data/jfk.flac cut at points 0.125 s apart (no timing: what a
flush costs a GPU is its host launches and syncs eager, one replay captured).

    .venv/bin/python tools/step-time.py [--steps 150] [--codec | --asr | --flush]

One torch thread, as the tests run the tiny models. Kernel counts are those of
``tests/test_engine_kernel_budget.py``; absolute times mean little beyond this machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def fastest(fn: Callable[[], None], steps: int) -> float:
    """The fastest of ``steps`` calls of ``fn`` (after five to warm up), in ms."""
    with torch.no_grad():
        for _ in range(5):
            fn()
        best = float("inf")
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--codec", action="store_true", help="the full-size Mimi's slot decode instead")
    parser.add_argument("--asr", action="store_true", help="the full-size FastConformer's steady step instead")
    parser.add_argument("--flush", action="store_true", help="the full-size FastConformer's flush, eager and captured")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.codec:
        codec_time(args.steps)
        return
    if args.asr:
        asr_time(args.steps)
        return
    if args.flush:
        flush_cost()
        return

    from duplex.llm.loader import load_checkpoint as load_llm
    from duplex.llm.model import LLMSettings, SinkLLM
    from duplex.llm.tiny import tiny_model_path
    from duplex.tts.engine import CsmEngine
    from duplex.tts.loading import load_checkpoint, tiny_checkpoint

    model, tokenizer = load_checkpoint(tiny_checkpoint(), "cpu")
    tts = CsmEngine(model, tokenizer, slots=8)
    llm_model, llm_tokenizer = load_llm(str(tiny_model_path("qwen2")), "cpu")
    llm = SinkLLM(llm_model, llm_tokenizer, "cpu", LLMSettings(window=512), slots=8)
    try:
        for name, engine in (("tts frame", tts), ("llm decode", llm.engine)):
            row = []
            for b in (1, 8):
                bucket = engine.graphs.bucket(b)
                engine._prepare(bucket)
                length = engine.graphs.lengths[0]
                row.append(f"batch {b} {fastest(lambda: engine.graphs.fn(bucket, length), args.steps):.2f} ms")
            print(f"{name}: {', '.join(row)}; {engine.ops_per_step(1)} ops a step "
                  f"(torch {torch.__version__}, fastest of {args.steps})")
    finally:
        llm.close()


def codec_time(steps: int) -> None:
    """The full-size Mimi's frame decode over static rows (:class:`duplex.tts.slot_codec.SlotDecoder`),
    each row's attention window full (130 frames decoded first)."""
    from transformers import MimiConfig, MimiModel

    from duplex.engine.opcount import count_ops
    from duplex.tts.configs import mimi_kwargs
    from duplex.tts.loading import fill_codebooks
    from duplex.tts.slot_codec import SlotDecoder

    torch.manual_seed(0)
    with torch.no_grad():
        codec = MimiModel(MimiConfig(**mimi_kwargs())).eval()
        fill_codebooks(codec)
        slots = SlotDecoder(codec, rows=32)
        row = []
        for b in (1, 8, 32):
            codes = torch.randint(0, 2048, (b, slots.num_codebooks))
            commit = torch.ones(b, dtype=torch.bool)
            for _ in range(130):
                slots.step(codes, commit)
            row.append(f"batch {b} {fastest(lambda: slots.step(codes, commit), steps):.2f} ms")
        ops = sum(count_ops(lambda: slots.step(codes[:1], commit[:1])).values())
    print(f"mimi frame decode: {', '.join(row)}; {ops} ops a step (torch {torch.__version__}, fastest of {steps})")


def asr_time(steps: int) -> None:
    """The full-size FastConformer's steady ASR step (subsampling, every layer, the RNNT decoding as a
    GPU captures it), on silence in the scratch slot, per context and batch."""
    import asyncio

    from duplex.asr.streaming import StreamingASR
    from duplex.asr.synthetic import build_random_large

    torch.set_num_threads(2)  # as duplex bench asr runs it on this machine
    model = build_random_large("cpu")
    for context in ((70, 0), (70, 6)):
        asr = StreamingASR(model, context=context, max_batch=8)
        try:
            asyncio.run(asr.warm_up())
            rehearse, asr.graphs.rehearse = asr.graphs.rehearse, True  # every label step, as captured
            row = []
            for b in (1, 8):
                bucket = asr.graphs.bucket(b)
                asr._prepare_step(bucket)
                length = asr.graphs.lengths[-1]
                row.append(f"batch {b} {fastest(lambda: asr.graphs.fn(bucket, length), steps):.1f} ms")
            asr.graphs.rehearse = rehearse
            print(f"asr step {list(context)}: {', '.join(row)}; {asr.ops_per_step(1)} ops a step "
                  f"(torch {torch.__version__}, fastest of {steps})")
        finally:
            asr.close()


def flush_cost() -> None:
    """Kernels of an endpoint's flush (``StreamingASR._flush``: the audio after the last chunk encoded
    provisionally and decoded) on the full-size FastConformer at [70,6], for streams of the jfk speech
    cut at 2.0, 2.125, ... 3.0 s (its blank bias tuned so that about 0.3 of the frames emit, as ``duplex
    bench asr`` tunes it; random weights then emit bursts of labels, so the labels a frame are printed): eager, every kernel launched from the host (and a host sync each
    label step); captured, the mel frames and subsampling launched from the host, then one replay."""
    import asyncio
    from pathlib import Path

    from duplex.asr.streaming import StreamingASR
    from duplex.asr.synthetic import build_random_large, tune_label_rate
    from duplex.audio import read_audio
    from duplex.engine.opcount import count_ops

    torch.set_num_threads(2)
    pcm, _ = read_audio(Path(__file__).parent.parent / "duplex" / "data" / "jfk.flac", 16000)
    model = build_random_large("cpu")
    eager, captured = (StreamingASR(model, context=(70, 6), max_batch=1) for _ in range(2))
    model.encoder.set_default_att_context_size([70, 6])
    with torch.no_grad():
        rate = tune_label_rate(model)  # labels in about 0.3 of the frames (bench asr's tuning); returns labels a frame
    captured.graphs.rehearse = True  # the captured calls, made eagerly

    async def count(asr: StreamingASR, cut: int) -> tuple[int, int]:
        stream = asr.new_stream()
        for i in range(0, cut, 320):
            await stream.feed(pcm[i:min(i + 320, cut)])
        state = stream.state
        frames: list[int] = []
        run = asr.flushes.run
        asr.flushes.run = lambda rows, needed: frames.append(needed) or run(rows, needed)
        try:
            ops = await asr.scheduler.run(lambda: sum(count_ops(lambda: asr._flush(state)).values()))
        finally:
            asr.flushes.run = run
            await stream.aclose()
        return ops, frames[0] if frames else 0

    async def main() -> None:
        for asr in (eager, captured):
            await asr.warm_up()
        print(f"asr flush [70,6] (torch {torch.__version__}, {rate:.2f} labels a frame): ops launched from the host, "
              "eager against captured")
        totals = [0, 0, 0, 0]
        for k in range(9):
            cut = 32000 + 2000 * k
            plain, _ = await count(eager, cut)
            again = captured.flushes_decoded_again
            both, frames = await count(captured, cut)
            graph = captured.ops_per_flush(frames) if frames else 0
            second, note = 0, ""
            if captured.flushes_decoded_again > again:  # its second step: every label step of every frame
                second = captured.flushes_again.ops(captured._prepare_flush, 1, frames)
                note = f", decoded again: a second replay of {second} kernels"
            print(f"  cut {cut / 16000:.3f} s, {frames} encoder frames: eager {plain} ops; captured "
                  f"{both - graph - second} ops + one replay of {graph} kernels{note}")
            totals = [totals[0] + plain, totals[1] + both - graph - second, totals[2] + graph, totals[3] + second]
        print(f"  mean over 9 flushes: eager {totals[0] / 9:.0f} ops; captured {totals[1] / 9:.0f} ops + a replay of "
              f"{totals[2] / 9:.0f} kernels (+ {totals[3] / 9:.0f} in second replays)")
        for asr in (eager, captured):
            await asr.aclose()

    asyncio.run(main())


if __name__ == "__main__":
    main()
