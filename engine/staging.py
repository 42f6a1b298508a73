"""Step inputs the host writes before each step: a static device buffer and its pinned host copy.

A captured step reads its inputs (positions, seeds, counters, rows, sampler settings) from static
device buffers. The host fills a pinned copy of each through a numpy view (no torch op per value),
then one non-blocking copy per buffer moves the entries this step uses over, in order before the
step on the same stream. The host writes the copy again only for the next step, after this step's
one output sync, so a copy in flight is never overwritten. Outputs come back the other way through
a :class:`Readback`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


class Staged:
    """A device buffer of ``shape`` (the step reads :attr:`buffer`) and its host copy (the host
    writes :attr:`host`, a numpy view of the pinned :attr:`staging` tensor); :meth:`push` copies the
    first ``n`` entries along the last axis over."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill: float = 0) -> None:
        import torch

        self.buffer = torch.full(shape, fill, dtype=dtype, device=device)
        self.staging = torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")
        self.host: np.ndarray = self.staging.numpy()

    def push(self, n: int, first: int | None = None) -> None:
        """Copy entries ``[..., :n]`` of the host copy to the device buffer (without waiting); with
        ``first``, only ``[:first, ..., :n]`` (the rows of a 2-D buffer the step reads)."""
        index = (Ellipsis, slice(n)) if first is None else (slice(first), Ellipsis, slice(n))
        self.buffer[index].copy_(self.staging[index], non_blocking=True)


class PassRows(Staged):
    """Where each entry of a prefill pass of several sessions writes (``[3, S]`` long, staged): its
    K/V row, first position and token count. Entries past those staged are padding: the scratch
    row, no tokens (so they write only its scratch column)."""

    def __init__(self, slots: int, device: torch.device, scratch_row: int) -> None:
        import torch

        super().__init__((3, slots), torch.long, device)
        self.scratch_row = scratch_row

    def stage(self, bucket: int, entries: list[tuple[int, int, int]]) -> None:
        """Entries ``(row, start, count)`` first, padding up to ``bucket``, pushed to the device."""
        self.host[:, :bucket] = ((self.scratch_row,), (0,), (0,))
        for i, entry in enumerate(entries):
            self.host[:, i] = entry
        self.push(bucket)

    def prepare(self, b: int) -> None:
        """Padding for entries ``0..b-1`` on the device (the harmless inputs of a capture)."""
        self.buffer[0, :b] = self.scratch_row
        self.buffer[1:, :b] = 0


class Readback:
    """Where a launched step leaves its outputs on the host: a pinned table ``shape`` (one step is in
    flight at a time, :mod:`duplex.engine.ahead`, and it is read before the next is launched).
    :meth:`queue` copies a step's output buffer into it as the step ends (no wait) and marks its end;
    :meth:`read` waits for the mark once and gives the table."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        import torch

        self.device = device
        self.table = torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")

    def queue(self, out: torch.Tensor, n: int) -> Any:
        """Copy ``out[:n]`` into the table once the work queued so far ends; that end (a CUDA event;
        None on the CPU, where the copy is done already)."""
        import torch

        self.table[:n].copy_(out[:n], non_blocking=True)
        if self.device.type != "cuda":
            return None
        end = torch.cuda.Event()
        end.record()
        return end

    def read(self, end: Any) -> torch.Tensor:
        """The table, once the copy marked ``end`` has landed: the host's one wait. (``.cpu()`` of
        pinned host memory copies nothing; the host-sync tests count it.)"""
        if end is not None:
            end.synchronize()
        return self.table.cpu()
