"""The engine scheduler: continuous batching of rows, jobs between steps, urgency, deadlines, and a
failing row that ends alone."""

from __future__ import annotations

import asyncio

import pytest

from duplex.engine.scheduler import Output, Scheduler


class Counter:
    """A row state: counts its steps up to ``limit``; fails at step ``fail_at`` (if set)."""

    def __init__(self, name: str, limit: int, fail_at: int | None = None) -> None:
        self.name, self.limit, self.fail_at, self.steps = name, limit, fail_at, 0


def make(log: list, **kwargs) -> Scheduler:
    def step(rows: list[Counter]) -> list[Output]:
        log.append(("step", tuple(r.name for r in rows)))
        if any(r.fail_at is not None and r.steps == r.fail_at for r in rows):
            raise ValueError("bad row")
        for r in rows:
            r.steps += 1
        return [Output(r.steps, done=r.steps >= r.limit) for r in rows]

    return Scheduler("test", step, **kwargs)


async def consume(s: Scheduler, row) -> list[int]:
    out = []
    while True:
        item = await s.next(row)
        out.append(item.value)
        if item.done:
            return out


async def test_rows_join_and_leave_between_steps():
    """A row that joins later shares the following steps; a finished row leaves at once."""
    log: list = []
    s = make(log)
    a = s.join(Counter("a", 4), room=1)
    first = await s.next(a)
    b = s.join(Counter("b", 2), room=1)
    outs = await asyncio.gather(consume(s, a), consume(s, b))
    assert [first.value] + outs[0] == [1, 2, 3, 4] and outs[1] == [1, 2]
    steps = [names for kind, names in log if kind == "step"]
    assert ("a", "b") in steps and steps[-1] == ("a",)  # b left after its last step
    await s.aclose()


async def test_urgent_jobs_run_before_the_step_and_others_after():
    """A job marked urgent runs at the start of the next tick, ahead of the batched step; the jobs
    after a step are bounded by the budget while rows wait."""
    log: list = []
    s = make(log, job_budget=2)
    row = s.join(Counter("a", 3), room=1)
    jobs = [s.run(log.append, ("job", i)) for i in range(5)]  # queued in call order, before any tick
    urgent = s.run(log.append, ("urgent", 0), urgent=True)
    await asyncio.gather(consume(s, row), *jobs, urgent)
    kinds = [entry[0] for entry in log]
    assert kinds.index("urgent") < kinds.index("step")
    between = []  # jobs run between two steps
    count = 0
    for kind in kinds[kinds.index("step"):]:
        if kind == "step":
            between.append(count)
            count = 0
        elif kind == "job":
            count += 1
    assert max(between + [count]) <= 2
    await s.aclose()


async def test_rows_that_run_dry_soonest_go_first():
    """With more rows ready than max_batch, the rows with the earliest deadlines are stepped."""
    log: list = []
    s = make(log, max_batch=2)
    rows = [s.join(Counter(name, 1), deadline=d, room=1) for name, d in (("late", 9.0), ("soon", 1.0), ("mid", 5.0))]
    await asyncio.gather(*(consume(s, r) for r in rows))
    steps = [names for kind, names in log if kind == "step"]
    assert set(steps[0]) == {"soon", "mid"} and steps[1] == ("late",)
    await s.aclose()


async def test_a_failing_row_ends_alone():
    """A step that raises is re-run row by row: only the row that fails alone gets the error, the
    others get their outputs and go on."""
    log: list = []
    s = make(log)
    good, bad = s.join(Counter("good", 3), room=1), s.join(Counter("bad", 3, fail_at=1), room=1)
    results = await asyncio.gather(consume(s, good), consume(s, bad), return_exceptions=True)
    assert results[0] == [1, 2, 3]
    assert isinstance(results[1], ValueError)
    await s.aclose()


async def test_a_row_is_not_stepped_while_its_consumer_lags():
    """A row holds at most ``room`` outputs: it is not stepped again until they are taken."""
    log: list = []
    s = make(log)
    row = s.join(Counter("a", 10), room=2)
    await s.run(lambda: None)
    await s.run(lambda: None)
    assert row.state.steps == 2
    await s.next(row)
    await s.run(lambda: None)
    assert row.state.steps == 3
    s.leave(row)
    await s.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await s.run(lambda: None)


async def test_closing_does_not_swallow_the_callers_cancellation():
    """``aclose`` absorbs the cancellation of its own dispatcher, never that of the task calling it."""
    s = make([])
    await s.run(lambda: None)  # the dispatcher is running
    closer = asyncio.create_task(s.aclose())
    await asyncio.sleep(0)  # the closer has cancelled the dispatcher and waits for it to end
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    with pytest.raises(RuntimeError, match="shutdown"):  # the worker thread was stopped all the same
        await s.worker.run(lambda: None)


async def test_a_job_whose_caller_left_while_it_ran_is_undone():
    """A job that takes something (a row) and whose caller is cancelled while it runs hands its
    result to its ``undo``, as the next job; without ``undo`` the result is simply dropped. (This
    lost a TTS reply row whenever a reply was stopped while its row was being taken.)"""
    import threading

    s = make([])
    started, go = threading.Event(), threading.Event()
    taken: list[int] = []
    given: list[int] = []

    def take(row: int) -> int:
        started.set()
        go.wait(5)
        taken.append(row)
        return row

    async def call(undo) -> int:
        return await s.run(take, len(taken), undo=undo)

    for undo in (given.append, None):
        started.clear()
        go.clear()
        caller = asyncio.create_task(call(undo))
        assert await asyncio.to_thread(started.wait, 5)  # the job runs on the worker
        caller.cancel()  # the caller leaves while the job runs on the worker
        await asyncio.sleep(0)
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await s.run(lambda: None)  # the undo (if any) was queued before this job
    assert taken == [0, 1] and given == [0]
    await s.aclose()


async def test_coalesced_items_run_together_once_per_period():
    """Items of a coalesced kind submitted within one period wait for the clock and run in one batch;
    a job submitted after an item makes the batch run first (before it, in the same tick); a batch
    that fails is re-run item by item, so only the bad item gets the error."""
    from time import monotonic as now  # the test loop's clock, readable on the worker thread too

    log: list = []
    s = make(log)
    batches: list[tuple] = []

    def run_batch(items: list) -> list:
        batches.append((round(now(), 3), tuple(items)))
        if "bad" in items:
            raise ValueError("bad item")
        return [f"done {i}" for i in items]

    kind = s.coalesce(run_batch, period=0.2)
    assert await kind.submit("first") == "done first"  # the first runs at once
    t0 = batches[-1][0]
    futures = [kind.submit(f"x{i}") for i in range(5)]
    await asyncio.sleep(0.05)
    futures.append(kind.submit("late"))
    assert await asyncio.gather(*futures) == [f"done x{i}" for i in range(5)] + ["done late"]
    assert batches[-1][1] == ("x0", "x1", "x2", "x3", "x4", "late")  # one batch, on the clock
    assert batches[-1][0] - t0 >= 0.2 - 1e-3

    before = now()
    item = kind.submit("y")
    job = s.run(lambda: log.append(("job", "after y")) or "job ran")
    assert await asyncio.gather(item, job) == ["done y", "job ran"]
    assert now() - before < 0.15 and log[-1] == ("job", "after y")  # not held for the period: the job waited

    await asyncio.sleep(0.25)
    good, bad = kind.submit("good"), kind.submit("bad")
    assert await good == "done good"
    with pytest.raises(ValueError, match="bad item"):
        await bad
    assert [b[1] for b in batches[-3:]] == [("good", "bad"), ("good",), ("bad",)]
    assert kind.batches == 4 and kind.handled == 10  # re-runs of a failed batch are not batches
    await s.aclose()


def test_a_clocked_scheduler_steps_many_streams_together_on_its_grid():
    """Streams that submit one row each at scattered times (as sessions' 20 ms audio blocks arrive)
    run at most one tick per period of the clock, at the grid's points, every row with its own
    result; without the clock the same rows tick one by one. On the virtual clock, so exact."""
    from duplex.clock import run_virtual

    def run(clock: float) -> tuple[list[tuple[str, ...]], list[float], dict[str, list[int]]]:
        log: list = []
        walls: list[float] = []
        got: dict[str, list[int]] = {}

        async def main():
            s = make(log, clock=clock)
            original, loop = s._step, asyncio.get_running_loop()

            def step(rows):  # (on the worker thread)
                walls.append(round(loop.time(), 6))
                return original(rows)

            s._step = step

            async def stream(name: str, phase: float) -> None:
                await asyncio.sleep(phase)
                state = Counter(name, 1000)
                for _ in range(5):
                    got.setdefault(name, []).append(await s.submit(state, key=name))
                    await asyncio.sleep(0.02)

            await asyncio.gather(*(stream(f"s{i}", 0.003 + 0.004 * i) for i in range(4)))
            await s.aclose()

        run_virtual(main())
        return [names for kind, names in log if kind == "step"], walls, got

    steps, walls, got = run(0.02)
    assert got == {f"s{i}": [1, 2, 3, 4, 5] for i in range(4)}
    assert len(steps) <= 7 and max(len(names) for names in steps) == 4  # 20 rows in a handful of ticks
    late = [w for w in walls[1:] if abs(w / 0.02 - round(w / 0.02)) > 1e-6]
    assert not late, f"ticks off the 20 ms grid at {late}"
    alone, _, got_alone = run(0.0)
    assert got_alone == got and len(alone) > 2 * len(steps)


def test_one_stream_alone_never_waits_for_the_clock():
    """A clocked scheduler with one stream steps each row at once, as an unclocked one does: the
    clock only trades waiting for batching when there is something to batch."""
    from duplex.clock import now, run_virtual

    async def main():
        s = make([], clock=0.02)
        state = Counter("a", 1000)
        waits = []
        for _ in range(5):
            await asyncio.sleep(0.0137)
            start = now()
            await s.submit(state, key="a")
            waits.append(now() - start)
        await s.aclose()
        return waits

    assert max(run_virtual(main())) < 1e-3


def test_a_job_never_waits_for_the_clock():
    """While a clocked scheduler holds rows for its next point, a job that comes (an ASR endpoint's
    flush) runs at once, with the rows waiting: the clock batches rows, it never delays a job."""
    from duplex.clock import now, run_virtual

    async def main():
        s = make([], clock=0.02)
        a, b = Counter("a", 1000), Counter("b", 1000)
        await asyncio.gather(s.submit(a, key="a"), s.submit(b, key="b"))  # two streams are stepping
        await asyncio.sleep(0.023)  # 3 ms past a point
        row = asyncio.ensure_future(s.submit(a, key="a"))  # waits for the point at 40 ms ...
        await asyncio.sleep(0.002)
        start = now()
        await s.run(lambda: "flushed")  # ... and this job comes meanwhile
        job_wait = now() - start
        await row
        await s.aclose()
        return job_wait

    assert run_virtual(main()) < 1e-3
