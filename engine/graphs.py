"""One captured step per batch-size bucket: CUDA graphs over static buffers, eager elsewhere.

An engine writes its step as ``fn(bucket, length)``: read the inputs of rows ``0..bucket-1`` from
static buffers, attend over the first ``length`` positions of each row, compute, write the outputs
into static buffers; no allocation is visible outside, no host sync inside. :class:`BucketedStep`
runs it for the smallest batch bucket that holds the rows asked for and the smallest length bucket
that holds the longest row (an engine whose rows are usually short, the TTS, skips attending over
the empty end of its buffers; one with a single length bucket always attends over all of them).
On CUDA (unless disabled) each bucket is warmed up and captured once, at load, largest first into
one shared memory pool (smaller buckets reuse the largest one's memory), and a step is one graph
replay. On the CPU, or with graphs off (``--no-graphs``), ``fn`` simply runs eagerly: the same
numbers, the same code path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in DEFAULT_BUCKETS if b < max_batch]
    return (*sizes, max_batch)


def lengths_for(positions: int, shortest: int = 256) -> tuple[int, ...]:
    """Attention lengths: powers of two from ``shortest`` below ``positions``, then ``positions``."""
    sizes = []
    n = shortest
    while n < positions:
        sizes.append(n)
        n *= 2
    return (*sizes, positions)


class BucketedStep:
    """``fn(bucket)`` for a set of buckets, captured per bucket on CUDA when ``graphs`` is true."""

    def __init__(self, name: str, fn: Callable[[int, int], Any], buckets: Sequence[int], lengths: Sequence[int], *,
                 device: str, graphs: bool) -> None:
        self.name = name
        self.fn = fn
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.lengths = tuple(sorted(set(int(n) for n in lengths)))
        self.device = device
        self.graphs_enabled = bool(graphs) and device.startswith("cuda")
        self._graphs: dict[tuple[int, int], Any] = {}
        self.capture_s = 0.0
        self.eager = False  # benchmarks: run the captured buckets eagerly, to compare
        self.compiled = False  # fn runs compiled kernels: capture() runs every bucket once even without graphs
        # tests on the CPU: capture() makes each bucket's capture call eagerly, on the inputs a GPU
        # would record it with, so a check can compare every later step with the call a graph holds
        self.rehearse = False
        self.last: tuple[int, int] | None = None  # the (batch, length) bucket of the latest step

    def bucket(self, rows: int) -> int:
        """The smallest bucket holding ``rows`` rows."""
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"{self.name}: {rows} rows exceed the largest bucket ({self.buckets[-1]})")

    def length(self, needed: int) -> int:
        """The shortest attention length holding ``needed`` positions."""
        for n in self.lengths:
            if n >= needed:
                return n
        raise ValueError(f"{self.name}: {needed} positions exceed the longest length ({self.lengths[-1]})")

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    @property
    def replays(self) -> bool:
        """Whether a step of these buckets is a graph replay (captured, not forced eager): one of a
        session alone is then cheaper than its own eager pass, whose every kernel is launched."""
        return self.captured and not self.eager

    def capture(self, prepare: Callable[[int], None] | None = None, progress: Callable[[str], None] | None = None,
                warmup: int = 2) -> None:
        """Warm up and capture every (batch, length) bucket, largest first, into one memory pool (CUDA only).

        ``prepare(bucket)`` puts harmless inputs into the static buffers first (rows at their scratch
        positions), so the warm-up steps change no session's state."""
        keys = [(b, n) for b in reversed(self.buckets) for n in reversed(self.lengths)]
        if not self.graphs_enabled and (self.rehearse or self.compiled):  # compile now, not in a session
            for b, n in keys:
                if prepare is not None:
                    prepare(b)
                self.fn(b, n)
        if not self.graphs_enabled or self._graphs:
            return
        import torch

        start = time.perf_counter()
        if progress is not None:
            progress(f"{self.name}: capturing {len(keys)} CUDA graphs (batch {','.join(map(str, self.buckets))}"
                     f" x length {','.join(map(str, self.lengths))})")
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for b, n in keys:
                if prepare is not None:
                    prepare(b)
                for _ in range(warmup):
                    self.fn(b, n)
        torch.cuda.current_stream().wait_stream(side)
        for b, n in keys:
            if prepare is not None:
                prepare(b)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.fn(b, n)
            self._graphs[(b, n)] = graph
        if progress is not None:
            progress(f"{self.name}: captured in {time.perf_counter() - start:.1f} s")
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start
        log.info("%s: captured %d CUDA graphs (buckets %s) in %.1f s", self.name, len(self._graphs),
                 ",".join(map(str, self.buckets)), self.capture_s)

    def reset(self) -> None:
        """Forget the captured graphs (a capture that failed half-way starts over)."""
        self._graphs.clear()
        self.capture_s = 0.0

    def ops(self, prepare: Callable[[int], None], bucket: int = 1, length: int | None = None) -> int:
        """Kernels one eager call of the step launches for ``bucket`` rows over ``length`` positions
        (the longest by default), counted by :func:`duplex.engine.opcount.count_ops`."""
        from duplex.engine.opcount import count_ops

        b, n = self.bucket(bucket), self.lengths[-1] if length is None else self.length(length)
        prepare(b)
        return sum(count_ops(lambda: self.fn(b, n)).values())

    def run(self, rows: int, needed: int) -> tuple[int, int]:
        """Run the step for ``rows`` rows and ``needed`` positions (each padded up to a bucket);
        returns the (batch, length) bucket used."""
        key = self.last = (self.bucket(rows), self.length(needed))
        graph = None if self.eager else self._graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            self.fn(*key)
        return key
