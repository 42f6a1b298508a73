"""Slot pools: which rows of an engine's per-session buffers (KV cache rows, codec states, encoder
caches) are held, and the lowest free one for the next session.

One pool type for every engine (LLM session rows, TTS reply rows, ASR stream rows), so the rules are
the same everywhere: a new holder gets the lowest free row (rows stay compact, so the batch buckets a
step is captured for stay small), a row given back twice is a bug named at once, and a full pool says
which option raises it. A pool without a capacity grows (the ASR's caches grow with it), and rows it
must never hand out (a captured step's scratch row for padding) are skipped.

Owned by the engine thread's caller (the event loop, or the core's request handler): not locked.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class SlotPool:
    """Rows ``0 .. capacity-1`` (or unbounded), minus ``reserved``; ``take`` gives the lowest free."""

    def __init__(self, what: str, capacity: int | None, *, reserved: Iterable[int] = (),
                 full_hint: str = "raise engine_slots (--engine-slots) to serve more sessions at once") -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"a slot pool's capacity must be >= 0, got {capacity}")
        self.what = what  # "LLM session slots": names the pool in its errors
        self.capacity = capacity
        self.full_hint = full_hint
        self._reserved = frozenset(reserved)
        self._given: list[int] = []  # a heap: rows given back, below _next
        self._held: set[int] = set()
        self._next = 0  # rows from here on were never handed out

    def _skip_reserved(self) -> None:
        while self._next in self._reserved:
            self._next += 1

    def take(self) -> int:
        """The lowest free row; a full pool raises naming the option that raises its capacity."""
        if self._given:
            row = heapq.heappop(self._given)
        else:
            self._skip_reserved()
            if self.capacity is not None and self._next >= self.capacity:
                raise RuntimeError(f"all {self.capacity} {self.what} are in use; {self.full_hint}")
            row = self._next
            self._next += 1
        self._held.add(row)
        return row

    def give(self, row: int) -> None:
        """Row ``row`` is free again (its holder is done with it)."""
        if row not in self._held:
            state = "released twice" if (row < self._next and row not in self._reserved) else "never taken"
            raise RuntimeError(f"{self.what}: row {row} {state}")
        self._held.remove(row)
        heapq.heappush(self._given, row)

    def move(self, row: int, to: int) -> None:
        """The holder of ``row`` holds the free row ``to`` instead, and ``row`` is free again (an engine
        that packs the rows of a step together moves their contents first)."""
        if row not in self._held:
            raise RuntimeError(f"{self.what}: row {row} moved but not held")
        if to < 0 or to in self._held or to in self._reserved or (self.capacity is not None and to >= self.capacity):
            raise RuntimeError(f"{self.what}: row {row} moved to row {to}, which is not free")
        if to < self._next:
            self._given.remove(to)
            heapq.heapify(self._given)
        else:  # never handed out: the rows before it become free rows
            for skipped in range(self._next, to):
                if skipped not in self._reserved:
                    heapq.heappush(self._given, skipped)
            self._next = to + 1
        self._held.add(to)
        self.give(row)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def free(self) -> int:
        """Rows a ``take`` can still hand out (a pool without a capacity: unbounded, an error)."""
        if self.capacity is None:
            raise RuntimeError(f"{self.what} grow without bound: they have no free count")
        usable = self.capacity - len(self._reserved & set(range(self.capacity)))
        return usable - len(self._held)

    def __contains__(self, row: int) -> bool:
        return row in self._held

    def __repr__(self) -> str:
        return f"SlotPool({self.what!r}, capacity={self.capacity}, held={sorted(self._held)})"
