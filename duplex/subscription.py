"""What a session publishes (events, the agent's audio), read as bounded async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
CLOSED = object()  # put last: the subscription ends there


class Subscription(Generic[T]):
    """An async iterator over what a session publishes, registered when created (nothing is missed).

    Bounded: a consumer that falls behind loses the oldest items, never blocks the session."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.dropped = 0
        # A live audio output that keeps frames of its own after reading them (a sound card's
        # queue) sets this: at a pause it drops those not played yet and returns how many.
        self.take_back: Callable[[], int] | None = None

    def queued(self) -> int:
        """Items published but not read yet."""
        return self._queue.qsize()

    def drop_newest(self, n: int) -> None:
        """Forget the ``n`` newest unread items (a live audio output's frames not heard yet)."""
        items = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for item in items[:len(items) - n]:
            self._queue.put_nowait(item)

    def publish(self, item: object) -> None:
        """Add an item; when full, the oldest unread one goes (counted in :attr:`dropped`)."""
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    def close(self) -> None:
        """No more items: a reader ends after those already queued."""
        self.publish(CLOSED)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if item is CLOSED:
            self._queue.put_nowait(CLOSED)  # stay closed for further reads
            raise StopAsyncIteration
        return item  # type: ignore[return-value]
