"""Test helper: a log of an engine's steps run ahead (``engine.ahead.RunAhead``): each launch (with
its rows), each read (with the steps it read) and each moment a reader took an output."""

from __future__ import annotations

from typing import Any


def log_steps(run_ahead: Any, scheduler: Any) -> list[tuple[str, int]]:
    """Wrap ``run_ahead``'s launch and collect and ``scheduler.next``; returns the log they fill:
    ``("launch", rows)``, ``("read", 1)``, ``("took", 0)``."""
    log: list[tuple[str, int]] = []
    launch, collect, take = run_ahead.launch, run_ahead.collect, scheduler.next

    def launched(states):
        step = launch(states)
        if step is not None:
            log.append(("launch", len(step.states)))
        return step

    def collected(step):
        log.append(("read", 1))
        return collect(step)

    async def taken(row):
        out = await take(row)
        log.append(("took", 0))
        return out

    run_ahead.launch, run_ahead.collect, scheduler.next = launched, collected, taken
    return log


def in_flight(log: list[tuple[str, int]]) -> list[int]:
    """Steps launched and not yet read after each entry of ``log``."""
    count, out = 0, []
    for kind, n in log:
        count += 1 if kind == "launch" else -n if kind == "read" else 0
        out.append(count)
    return out


def in_flight_when_taken(log: list[tuple[str, int]]) -> list[bool]:
    """For each output a reader took: whether a step was in flight at that moment."""
    return [n > 0 for (kind, _), n in zip(log, in_flight(log)) if kind == "took"]
