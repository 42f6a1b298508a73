"""Checks, on the CPU, that an engine step can be captured once and replayed as a CUDA graph.

A CUDA graph records the kernels of one call of ``fn(bucket, length)`` with their arguments fixed:
tensor addresses, shapes, and every Python number passed to an op. A replay reruns exactly those
kernels. It is right only if ``fn`` reads everything that changes from one step to the next out of
the same static buffers, and never asks the host anything. No GPU runs these tests, so
:class:`StepTrace` checks those properties on the CPU. It records every aten op of each call of a
step, through PyTorch's dispatcher:

- *forbidden ops*: a host sync (``item``, ``.tolist()``, ``bool(t)``), an op whose output shape
  depends on data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``), a tensor made
  from host data inside the step (``torch.tensor(...)``: it would be baked in at capture), and
  random draws from a generator (the engines' sampling is hashed, stateless noise);
- *replayability*: every call with the same (bucket, length) must run the same ops, on the same
  shapes, with the same Python arguments, and read the same addresses for every tensor it did not
  make itself. Otherwise a replay of the first call would compute something other than the later
  call did.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FORBIDDEN = {
    "item": "a host sync (.item(), float(t), bool(t), .tolist())",
    "_local_scalar_dense": "a host sync",
    "nonzero": "an output shape that depends on data",
    "nonzero_static": None,  # fixed size: allowed
    "masked_select": "an output shape that depends on data",
    "unique": "an output shape that depends on data",
    "_unique": "an output shape that depends on data",
    "_unique2": "an output shape that depends on data",
    "unique_consecutive": "an output shape that depends on data",
    "repeat_interleave": "an output shape that depends on data",
    "lift_fresh": "a tensor made from host data inside the step (baked in at capture)",
    "lift_fresh_copy": "a tensor made from host data inside the step (baked in at capture)",
    "rand": "a draw from a random generator",
    "randn": "a draw from a random generator",
    "randint": "a draw from a random generator",
    "rand_like": "a draw from a random generator",
    "randn_like": "a draw from a random generator",
    "bernoulli": "a draw from a random generator",
    "multinomial": "a draw from a random generator",
    "exponential": "a draw from a random generator",
    "uniform": "a draw from a random generator",
    "normal": "a draw from a random generator",
}


def _op_name(func: Any) -> str:
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    return name.split(".")[0].rstrip("_")  # "index.Tensor" -> "index", "exponential_" -> "exponential"


class _Recorder(TorchDispatchMode):
    """Every aten op of one call: its name, and a signature of its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.made: set[int] = set()  # storages of tensors this call created
        self.outside: set[int] = set()  # storages the call read before making them: its buffers, weights
        self.ops: list[tuple] = []
        self.problems: list[str] = []

    def _sig(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage().data_ptr()
            if storage not in self.made:
                self.outside.add(storage)
            where = "made" if storage in self.made else value.data_ptr()
            return ("T", tuple(value.shape), value.dtype, tuple(value.stride()), where)
        if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                              torch.memory_format, slice)):
            return value
        return repr(value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        why = FORBIDDEN.get(name)
        if why:
            self.problems.append(f"{func}: {why}")
        flat, _ = tree_flatten((args, kwargs))
        if name in ("index", "index_put") and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                                   for a in flat):
            self.problems.append(f"{func} with a boolean mask: an output shape that depends on data")
        signature = (str(func), tuple(self._sig(a) for a in flat))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.outside:
                self.made.add(t.untyped_storage().data_ptr())  # a view or an in-place write stays outside
        self.ops.append(signature)
        return out


class StepTrace:
    """Wraps an engine's :class:`~duplex.engine.graphs.BucketedStep` so that every call of its step
    is recorded; :meth:`problems` says what would keep a captured graph from replaying it."""

    def __init__(self, step: Any) -> None:
        self.step = step
        self.fn: Callable[[int, int], Any] = step.fn
        self.calls: dict[tuple[int, int], list[list[tuple]]] = defaultdict(list)
        self.forbidden: list[str] = []
        step.fn = self._traced

    def _traced(self, b: int, length: int) -> Any:
        recorder = _Recorder()
        with recorder:
            out = self.fn(b, length)
        self.calls[(b, length)].append(recorder.ops)
        self.forbidden.extend(recorder.problems)
        return out

    def restore(self) -> None:
        self.step.fn = self.fn

    def problems(self) -> list[str]:
        """Forbidden ops, then every (bucket, length) whose calls differ, with the first difference."""
        found = sorted(set(self.forbidden))
        for key, traces in sorted(self.calls.items()):
            first = traces[0]
            for n, trace in enumerate(traces[1:], start=2):
                if trace == first:
                    continue
                if len(trace) != len(first):
                    found.append(f"bucket {key}: call {n} ran {len(trace)} ops, call 1 ran {len(first)}")
                    break
                i = next(i for i, (a, b) in enumerate(zip(first, trace)) if a != b)
                found.append(f"bucket {key}: call {n} differs from call 1 at op {i}: {first[i]} != {trace[i]}")
                break
        return found

    @property
    def repeated(self) -> int:
        """How many calls ran for a bucket already seen (the calls a replay would have served)."""
        return sum(len(traces) - 1 for traces in self.calls.values())

    @property
    def fewest_ops(self) -> int:
        """The fewest aten ops any recorded call ran (a check that saw no ops would prove nothing)."""
        return min((len(t) for traces in self.calls.values() for t in traces), default=0)
