"""Fused kernels for the engines' steps: each decoder layer (and the sampler) compiled by Inductor.

An eager layer is some fifteen to thirty kernels (two RMSNorms, one fused kernel each on CUDA and
six on the CPU, RoPE, the K/V writes, attention, four matrix products, the gated MLP), most of them tiny: on a GPU the step then waits between kernels
rather than on memory. :func:`compile_fn` hands a function to ``torch.compile`` (Inductor), which
fuses each chain of element-wise work and reductions into one Triton kernel and leaves the matrix
products and the attention to their own kernels: about ten kernels a layer. The engines compile the
*layer* (one compiled function serves every layer of a model, with dynamic shapes for every batch
size, prefill length and attention length), not the whole step, so compiling takes seconds per
variant instead of minutes, and the compiled layer runs inside the CUDA graphs the engines capture
(:mod:`duplex.engine.graphs`) exactly as the eager one does.

Compiling happens at load, in the engines' warm-up (with a progress line); Inductor's artifacts are
cached between runs under the duplex cache (``$DUPLEX_CACHE/inductor``), so later loads take
seconds. Only CUDA compiles: on the CPU the eager layer is as fast for the tiny models tests use and
needs no C++ toolchain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from duplex.engine.decoder import LeanDecoder, SlotKV

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


def wanted(device: str, compile: bool) -> bool:
    """Whether an engine on ``device`` compiles its steps: asked for, on CUDA (the CPU runs eagerly)."""
    return bool(compile) and str(device).startswith("cuda")


def compile_fn(fn: F) -> F:
    """``fn`` compiled by Inductor with dynamic shapes, whole (no graph breaks); caches under the duplex
    cache unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise."""
    import torch

    from duplex.config import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    # one compiled layer serves every layer; batch buckets, prefill lengths and depth steps each add
    # a variant or two at most, far under this limit
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name before 2.7
    setattr(config, name, max(getattr(config, name), 64))
    # every dimension its own symbol: sizes that happen to be equal when a variant is traced (an
    # attention length and the K/V column count, the hidden size) are not taken for one another
    # (on the H200 with torch 2.11 they were, and the compiled TTS layer failed its stride check)
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False
    return torch.compile(fn, dynamic=True, fullgraph=True)  # type: ignore[return-value]


def warm_prefills(decoder: LeanDecoder, kv: SlotKV, progress: Callable[[str], None] | None, name: str) -> None:
    """Compile the fused layer for the prefill shapes now, not in a session's first turn: prefills of
    several tokens and of one, into the scratch row (which no session reads)."""
    import time

    import torch

    start = time.perf_counter()
    if progress is not None:
        progress(f"{name}: compiling fused layers (the first run on a machine takes a minute or two; cached after)")
    for n in (3, 2, 1):
        decoder.prefill(torch.zeros(n, decoder.hidden, dtype=decoder.dtype, device=decoder.device), kv,
                        kv.scratch_row, 0)
    log.info("%s: prefill variants compiled in %.1f s", name, time.perf_counter() - start)


class eager_layers:
    """Within this block the decoders run their plain (unfused) layers: counting ops, comparing."""

    def __init__(self, *decoders: LeanDecoder) -> None:
        self.decoders = decoders
        self.saved: list = []

    def __enter__(self) -> None:
        self.saved = [d.layer_fn for d in self.decoders]
        for d in self.decoders:
            d.layer_fn = d.layer

    def __exit__(self, *exc: object) -> None:
        for d, fn in zip(self.decoders, self.saved):
            d.layer_fn = fn


def with_fallback(capture: Callable[[], None], eager: Callable[[], None], compiled: bool,
                  progress: Callable[[str], None] | None, name: str) -> bool:
    """Run ``capture()`` (an engine's compile, warm-up and capture); if the compiled kernels fail
    there, say so, switch the engine to its eager layers (``eager()``) and capture again. Returns
    whether the engine still runs compiled kernels."""
    if not compiled:
        capture()
        return False
    try:
        capture()
        return True
    except Exception as exc:  # an Inductor or Triton failure on this machine: run unfused, not at all
        log.exception("%s: the fused layers failed; running them unfused", name)
        if progress is not None:
            progress(f"{name}: the fused layers failed ({type(exc).__name__}: {exc}); running them unfused")
        eager()
        capture()
        return False


def agreement(decoder: LeanDecoder, kv: SlotKV, tokens: int = 16) -> float:
    """The relative difference of the fused layers from the unfused ones on one prefill of ``tokens``
    random inputs into the scratch row: ``|fused - unfused| / |unfused|`` of the final hidden states
    (rounding differs, in bf16 about 1e-2 at most; a wrong kernel gives about 1)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, decoder.hidden, generator=g).to(decoder.device, decoder.dtype)
    with torch.inference_mode():
        fused = decoder.prefill(x, kv, kv.scratch_row, 0).float()
        with eager_layers(decoder):
            plain = decoder.prefill(x, kv, kv.scratch_row, 0).float()
    return float((fused - plain).norm() / plain.norm())
