"""A step run ahead: the bookkeeping the engines whose next step is known early share (LLM, TTS).

Once a step's outputs are booked on the host, the inputs of the rows' next step are known (the LLM's
sampled token, the TTS's next frame, which stays on the device), so the worker can launch that step
before its tick hands the outputs over (:class:`~duplex.engine.scheduler.Ahead`). The device then
computes step k+1 while the host passes step k's outputs to the sessions and plans the next tick,
instead of idling between the two.

:class:`RunAhead` is the scheduler's step function for such an engine. A row that joins while a step
runs ahead is not launched beside it (a second step in one tick would read every weight twice): it
gets ``LATER`` (nothing yet) from this tick and joins the launch made at its end. A row whose reader
has no room for one more output is left out of that launch and waits until its reader takes one. A
tick thus launches one step and waits once. Each row's output of a step run ahead is booked on its
state (``state.held``) until the row is stepped. A state closed meanwhile gets nothing booked
(``book`` says None): its step is void, as if it had not run, since an engine's step commits nothing
on the host before it is booked.

The engine supplies four plain functions: ``launch(states)`` starts one step of those states that
can step (its result names them in ``.states``; None when none can), ``collect(launched)`` waits
for it and reads its result, and ``book(launched, result)`` commits a launch's result into
its states and gives each one's :class:`~duplex.engine.scheduler.Output` (None: closed meanwhile),
and ``live(state)`` says whether a state can still step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from duplex.engine.scheduler import LATER, Ahead, Output


class Holder(Protocol):
    held: Output | None  # its output of a step run ahead, booked and not yet handed out


class Launch(Protocol):
    @property
    def states(self) -> Sequence[Any]: ...


S = TypeVar("S", bound=Holder)
L = TypeVar("L", bound=Launch)


@dataclass
class RunAhead(Generic[S, L]):
    """One engine's step with its next step run ahead (see the module's docstring)."""

    launch: Callable[[list[S]], L | None]
    collect: Callable[[L], Any]
    book: Callable[[L, Any], list[Output | None]]
    live: Callable[[S], bool]  # whether a state can still step (not closed or superseded)
    closed: Output | BaseException  # what a state that could not step gets (closed or superseded meanwhile)
    pending: L | None = None  # the step launched ahead, not yet read

    @property
    def hooks(self) -> Ahead:
        return Ahead(self.launch_ahead, self.settle)

    def step(self, states: list[S]) -> list[Output | BaseException]:
        """The batched step (worker thread): the rows of the step run ahead take what it made, and
        rows that join while it runs get ``LATER`` and join the next launch; with none running ahead,
        the rows are launched now and read. (A step that fails is re-run for each row alone by
        the scheduler: the rows already booked hold their outputs, the others launch again on their
        unchanged state.)"""
        pending, self.pending = self.pending, None
        if pending is not None:  # rows that join wait for the next launch, made at this tick's end
            self._hold(pending, self.collect(pending))
        else:
            step = self.launch([state for state in states if state.held is None])
            if step is not None:
                self._hold(step, self.collect(step))
        outputs: list[Output | BaseException] = []
        for state in states:
            if state.held is not None:
                outputs.append(state.held)
            else:
                outputs.append(LATER if pending is not None and self.live(state) else self.closed)
            state.held = None
        return outputs

    def launch_ahead(self, states: list[S]) -> None:
        """Launch the next step of ``states`` without waiting (the end of a tick)."""
        assert self.pending is None, "a step already runs ahead"
        self.pending = self.launch([state for state in states if state.held is None])

    def settle(self) -> None:
        """Wait for the step run ahead and book it (before a tick's jobs, which must see it committed)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self._hold(pending, self.collect(pending))

    def _hold(self, step: L, result: Any) -> None:
        for state, out in zip(step.states, self.book(step, result)):
            if out is not None:
                state.held = out
