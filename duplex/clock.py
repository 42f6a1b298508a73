"""The session clock: event-loop time, real or virtual.

All timing in duplex (audio pacing, turn-taking timers, fake stage delays, event ``wall`` stamps) uses
the running event loop's ``time()`` and ``asyncio.sleep``. In real time that is the monotonic clock.
For simulations, :func:`run_virtual` runs a coroutine on a :class:`VirtualTimeLoop`, whose clock
jumps straight to the next timer whenever nothing is ready to run and no worker-thread job is in
flight. Model compute is therefore free in virtual time: a simulated hour runs as fast as the models
compute, and figures measured under it are the pipeline's algorithmic latencies (endpointing waits,
chunk look-ahead, pacing), deterministic from run to run.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from typing_extensions import TypeVarTuple, Unpack

    _Ts = TypeVarTuple("_Ts")

T = TypeVar("T")


def now() -> float:
    """Seconds on the running loop's clock (virtual under :func:`run_virtual`)."""
    return asyncio.get_running_loop().time()


class _VirtualSelector(selectors.DefaultSelector):
    """A selector that, instead of sleeping until the next timer, advances the loop's clock to it."""

    loop: VirtualTimeLoop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(0)
        if self.loop.jobs_in_flight:
            # A worker thread is computing: wait for it (its result wakes us through the self-pipe).
            return super().select(None)
        events = super().select(0)
        if events:
            return events
        if timeout is None:  # no timer at all: only outside I/O can wake us
            return super().select(None)
        self.loop.advance(timeout)
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring)."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = 0.0
        self._jobs = 0

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    @property
    def jobs_in_flight(self) -> int:
        return self._jobs

    def run_in_executor(self, executor: Executor | None, func: Callable[[Unpack[_Ts]], T],
                        *args: Unpack[_Ts]) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        # Counted on the loop thread, released when the result has reached the loop, so the clock
        # never moves while a job's result is still in transit.
        self._jobs += 1
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, _future: asyncio.Future) -> None:
        self._jobs -= 1


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh :class:`VirtualTimeLoop` (closed afterwards, with its
    leftover tasks cancelled and its async generators shut down, as ``asyncio.run`` does)."""
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
