"""Time one eager step of the tiny engines on this machine: the TTS frame step (backbone, every depth
step, every draw, the codec's decode) and the LLM decode step, at batch 1 and 8, with the kernels each
launches. The fastest of ``--steps`` calls is printed (on a shared CPU the minimum is the figure
least moved by other work); compare revisions by running this in alternation, one process each.

    .venv/bin/python tools/step-time.py [--steps 150]

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
    args = parser.parse_args()
    torch.set_num_threads(1)

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


if __name__ == "__main__":
    main()
