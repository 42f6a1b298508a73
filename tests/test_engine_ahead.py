"""Running a step ahead (``engine.ahead.RunAhead`` under the scheduler), on a counting engine: the
outputs are those of plain steps, jobs never see a step in flight, rows that join are put into the
next launch (never a second step beside the one in flight), and a closed row gets its closed output."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from duplex.engine.ahead import RunAhead
from duplex.engine.scheduler import Output, Scheduler
from test_engine_scheduler import consume


@dataclass(eq=False)
class Row:
    """A row state: counts its booked steps up to ``limit``."""

    limit: int
    value: int = 0
    closed: bool = False
    held: Output | None = None


@dataclass
class Step:
    states: list[Row]
    result: list[int]  # computed at launch, as a device would


def make(ahead: bool, log: list) -> tuple[Scheduler, RunAhead]:
    def launch(rows: list[Row]) -> Step | None:
        live = [r for r in rows if not r.closed]
        if not live:
            return None
        log.append(("launch", len(live)))
        time.sleep(0.002)  # the device's time
        return Step(live, [r.value + 1 for r in live])

    def collect(step: Step) -> list[int]:
        log.append(("read", 1))
        return step.result

    def book(step: Step, result: list[int]) -> list[Output | None]:
        out: list[Output | None] = []
        for row, value in zip(step.states, result):
            if row.closed:
                out.append(None)
                continue
            row.value = value
            out.append(Output(value, done=value >= row.limit))
        return out

    run = RunAhead(launch, collect, book, lambda r: not r.closed, closed=RuntimeError("closed"))
    return Scheduler("count", run.step, ahead=run.hooks if ahead else None), run


async def _drive(s: Scheduler) -> list[list[int]]:
    """Three rows joining at different steps; each row's outputs."""
    async def one(limit: int, delay: float) -> list[int]:
        await asyncio.sleep(delay)
        return await consume(s, s.join(Row(limit), room=2))

    return list(await asyncio.gather(one(12, 0.0), one(8, 0.005), one(10, 0.01)))


async def test_steps_run_ahead_give_the_plain_outputs_one_step_in_flight_at_a_time():
    """The same outputs with and without running ahead; no two steps were ever in flight and every
    read took one step (rows that joined waited for the next launch)."""
    s, _ = make(False, [])
    expected = await _drive(s)
    await s.aclose()
    log: list = []
    s, _ = make(True, log)
    got = await _drive(s)
    await s.aclose()
    assert got == expected == [list(range(1, 13)), list(range(1, 9)), list(range(1, 11))]
    flying = 0
    for kind, n in log:
        flying += 1 if kind == "launch" else -n
        assert 0 <= flying <= 1, log
    assert max(n for kind, n in log if kind == "launch") == 3  # the rows shared steps


async def test_a_row_closed_while_its_step_runs_ahead_gets_nothing_of_it():
    """A row closed after a step was launched ahead for it: that step is void (its value is not
    booked), and stepping the row again gives its closed output."""
    log: list = []
    s, run = make(True, log)
    row = s.join(Row(100), room=4)
    assert (await s.next(row)).value == 1
    assert run.pending is not None  # its second step runs ahead
    row.state.closed = True
    await s.run(lambda: None)  # settles it
    assert row.state.value == 1 and row.state.held is None
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(s.next(row), 5)
    await s.aclose()


async def test_a_job_never_sees_a_step_in_flight():
    """A job that comes while a step runs ahead (its row no longer stepping) runs only after that step
    is read and booked: jobs and coalesced work always see committed state."""
    s, run = make(True, [])
    row = s.join(Row(100), room=2)
    assert (await s.next(row)).value == 1
    assert run.pending is not None  # the second step runs ahead
    s.leave(row)
    assert await s.run(lambda: (run.pending, row.state.value)) == (None, 2)
    await s.aclose()
