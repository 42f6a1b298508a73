"""How many kernels one engine step launches, counted on any device (the CPU included).

A captured step is one graph replay, but the GPU still runs every kernel inside it one after the
other (a few microseconds each, however little work each does), and an eager step pays the host's
launch cost per kernel on top. The number of kernels per step is therefore the figure to keep down,
and it can be counted without a GPU: :func:`count_ops` records every aten op a call reaches through
PyTorch's dispatcher and leaves out the ones that launch nothing (views, reshapes that stay views,
allocations without a fill). Benchmarks print it beside their timings, and a CPU test holds each
step under a budget, so a regression shows before any GPU sees it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

# aten ops that only make a view, change metadata or allocate without writing: no kernel runs.
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "expand", "expand_as", "slice", "select",
    "split", "split_with_sizes", "unbind", "chunk", "narrow", "t", "transpose", "unsqueeze", "squeeze",
    "as_strided", "alias", "detach", "view_as", "unfold", "diagonal", "movedim", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_to_copy_view", "resolve_conj", "resolve_neg",
    "view_as_real", "view_as_complex", "real", "imag", "_local_scalar_dense", "size", "stride", "storage_offset",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "dim", "numel",
})


def op_name(func: Any) -> str:
    """``aten.index_put_.default`` -> ``index_put``."""
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    return name.split(".")[0].rstrip("_")


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Run ``fn()`` once and count, by name, the aten ops it ran that launch a kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = op_name(func)
            if name not in NO_KERNEL:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return counts


def inductor_kernels(code: str) -> list[str]:
    """The kernels one call of an Inductor-compiled graph launches, read from the module Inductor
    generated for it (``torch._inductor.utils.run_and_get_code``): its own fused kernels (``cpp_fused_*``
    on the CPU, ``triton_*`` on a GPU) and the library kernels it calls out to (matrix products,
    attention), in launch order, by name. (The count of a compiled step, where :func:`count_ops`
    sees the plain one.)"""
    import re

    body = code[code.index("def call("):]
    launch = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+(?=\.run)|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)"
                        r"(?:\.run|\.default)?\(", re.M)
    return [m.group(1) for m in launch.finditer(body)]
