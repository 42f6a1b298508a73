"""Checks, on the CPU, that an engine step can be captured once and replayed as a CUDA graph.

A CUDA graph records the kernels of one call of ``fn(bucket, length)`` with their arguments fixed:
tensor addresses, shapes, and every Python number passed to an op. A replay reruns exactly those
kernels. It is right only if ``fn`` reads everything that changes from one step to the next out of
the same static buffers, and never asks the host anything. No GPU runs these tests, so
:class:`StepTrace` checks those properties on the CPU. It records every aten op of each call of a
step, through PyTorch's dispatcher:

- *forbidden ops*: a host sync (``item``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``bool(t)``,
  any op that answers a Python value), an op whose output shape depends on data (``nonzero``,
  boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``), a tensor made from host data
  inside the step (``torch.tensor(...)``: it would be baked in at capture), a read of a host
  staging buffer (on a GPU the step's inputs are copied from those before it runs), and random
  draws from a generator (the engines' sampling is hashed, stateless noise);
- *replayability*: every call with the same (bucket, length) must run the same ops, on the same
  shapes, with the same Python arguments, read the same addresses for every tensor it did not
  make itself, and take as arguments the same of the tensors it made (by order of making: a branch
  between two same-shaped results shows). Otherwise a replay of the first call would compute
  something other than the later call did;
- *stable buffers*: the engine's tensors (its attributes, one level into the objects holding them)
  are the same before and after every call: a step that rebinds an output buffer would leave a
  captured graph writing where nobody reads.

The engine's ``capture()`` with ``graphs.rehearse`` set makes each bucket's capture call eagerly
first, on the inputs a GPU records it with, so every session's call is compared with the call a
graph would hold. Values the step reads from Python that change only later are seen when the
scenario changes them.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
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
    "bincount": "an output shape that depends on data",
    "unique_dim": "an output shape that depends on data",
    "equal": "a host sync (it answers a Python bool)",
    "is_nonzero": "a host sync (bool(t))",
    "rand": "a draw from a random generator",
    "random": "a draw from a random generator",
    "randperm": "a draw from a random generator",
    "poisson": "a draw from a random generator",
    "native_dropout": "a draw from a random generator (dropout left on)",
    "dropout": "a draw from a random generator (dropout left on)",
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

    def __init__(self, host: set[int]) -> None:
        super().__init__()
        self.made: dict[int, int] = {}  # storage of each tensor this call allocated -> its order of making
        self.allocations = 0
        self.outside: set[int] = set()  # storages the call read before making them: its buffers, weights
        self.host = host  # storages of host staging buffers
        self.ops: list[tuple] = []
        self.problems: list[str] = []

    def _sig(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage().data_ptr()
            if storage in self.host:
                self.problems.append("the step reads a host staging buffer (on a GPU: a copy baked in at capture)")
            if storage in self.made:
                where: Any = ("made", self.made[storage], value.storage_offset())
            else:
                self.outside.add(storage)
                where = value.data_ptr()
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
        if isinstance(out, (bool, int, float)):
            self.problems.append(f"{func} answers a Python value: a host sync")
        inputs = {id(a) for a in flat if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in inputs or t._base is not None:
                continue  # an in-place result or a view: the storage it lives in keeps its name
            storage = t.untyped_storage().data_ptr()
            if storage not in self.outside:  # a new allocation (perhaps where a freed one was)
                self.made[storage] = self.allocations
                self.allocations += 1
        self.ops.append(signature)
        return out


_HOST_SYNCS = ("tolist", "numpy", "cpu")  # never reach the dispatcher on a CPU tensor


# Tensor methods that copy to the host and never reach the dispatcher on a CPU tensor: watched by
# wrapping them. Engines step on several worker threads at once, each watched on its own, so the
# wrappers are installed once while any watch is open (counted, under a lock) and each call reports to
# the watches open on its own thread. (Saving and restoring the methods per watch lost reports when two
# threads' watches interleaved: the watch closing last put back a wrapper of one closed before it.)
_local = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_originals: dict[str, Callable] = {}
HostCopy = Callable[[str, torch.Tensor, Any], Any]  # (method, tensor, its result) -> the result to return


def _thread_watches() -> list[HostCopy]:
    if not hasattr(_local, "watches"):
        _local.watches = []
    return _local.watches


def _wrapped(name: str, original: Callable) -> Callable:
    def call(t, *args, **kwargs):
        out = original(t, *args, **kwargs)
        for watch in list(_thread_watches()):
            out = watch(name, t, out)
        return out
    return call


@contextlib.contextmanager
def _host_copies(watch: HostCopy) -> Iterator[None]:
    """Call ``watch`` for every host-copying tensor method called on this thread inside the block."""
    global _patch_users
    with _patch_lock:
        _patch_users += 1
        if _patch_users == 1:
            _originals.update({name: getattr(torch.Tensor, name) for name in _HOST_SYNCS})
            for name, original in _originals.items():
                setattr(torch.Tensor, name, _wrapped(name, original))
    _thread_watches().append(watch)
    try:
        yield
    finally:
        _thread_watches().remove(watch)
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for name, original in _originals.items():
                    setattr(torch.Tensor, name, original)


def _watch_host_syncs(problems: list[str]) -> contextlib.AbstractContextManager[None]:
    """Record calls of tensor methods that copy to the host, made on this thread while tracing."""
    def watch(name: str, t: torch.Tensor, out: Any) -> Any:
        problems.append(f"Tensor.{name}(): a host sync")
        return out
    return _host_copies(watch)


def _tensors_of(owner: Any) -> dict[str, int]:
    """The address of every tensor ``owner`` holds: its attributes, and one level into the objects,
    lists and tuples among them (buffers dataclasses, K/V pools); modules are left out (weights)."""
    found: dict[str, int] = {}

    def visit(path: str, value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            found[path] = value.data_ptr()
        elif depth and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{path}[{i}]", item, depth - 1)
        elif depth and hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
            for name, item in vars(value).items():
                visit(f"{path}.{name}", item, depth - 1)

    for name, value in vars(owner).items():
        visit(name, value, 2)
    return found


class StepTrace:
    """Wraps an engine's :class:`~duplex.engine.graphs.BucketedStep` so that every call of its step
    is recorded; :meth:`problems` says what would keep a captured graph from replaying it."""

    def __init__(self, step: Any, host_buffers: Sequence[torch.Tensor] = ()) -> None:
        self.step = step
        self.fn: Callable[[int, int], Any] = step.fn
        self.owner = getattr(self.fn, "__self__", None)  # the engine whose method the step is
        self.host = {t.untyped_storage().data_ptr() for t in host_buffers}
        self.calls: dict[tuple[int, int], list[list[tuple]]] = defaultdict(list)
        self.forbidden: list[str] = []
        step.fn = self._traced

    def _traced(self, b: int, length: int) -> Any:
        before = _tensors_of(self.owner) if self.owner is not None else {}
        recorder = _Recorder(self.host)
        with _watch_host_syncs(recorder.problems), recorder:
            out = self.fn(b, length)
        if self.owner is not None:
            after = _tensors_of(self.owner)
            moved = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            if moved:
                recorder.problems.append(f"the step rebinds the engine's tensors {moved}: a captured graph "
                                         "would keep writing to the old ones")
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


class HostSyncs(TorchDispatchMode):
    """Counts, inside the block on this thread, what would make the host wait for a GPU: a ``.cpu()``
    copy, ``.tolist()``, ``.item()``/``int()``/``bool()`` or an op whose output shape depends on data,
    each on a tensor that lives on the device. On the CPU every tensor is a host tensor, so device
    and host are told apart by where a tensor came from: a ``.cpu()`` result, and whatever is computed
    from host tensors only, is on the host; everything else would be on the engine's device.
    ``counts``: by kind (``cpu``, ``tolist``, the aten op), with where it happened."""

    _SCALAR_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique")

    def __init__(self) -> None:
        super().__init__()
        self.host: set[int] = set()  # storages of host tensors
        self.counts: list[str] = []

    def _on_host(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.host

    def __enter__(self):
        self._copies = _host_copies(self._host_copy)
        self._copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._copies.__exit__(None, None, None)
        return super().__exit__(*exc)

    def _host_copy(self, name: str, t: torch.Tensor, out: Any) -> Any:
        if name == "numpy" or self._on_host(t):
            return out
        self.counts.append(name)
        if name == "cpu":  # a copy even on the CPU, so that its storage is told apart from the device tensor's
            out = out.clone() if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else out
            self.host.add(out.untyped_storage().data_ptr())
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        name = _op_name(func)
        if name in self._SCALAR_OPS and tensors and not all(self._on_host(t) for t in tensors):
            self.counts.append(name)
        out = func(*args, **kwargs)
        if tensors and all(self._on_host(t) for t in tensors):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.host.add(t.untyped_storage().data_ptr())
        return out
