"""The scheduler of one engine: batched steps for every session that needs one, jobs between them.

One :class:`Scheduler` owns a model's worker thread (:class:`~duplex.worker.ModelWorker`). Sessions
reach the model in two ways:

- **Rows** (:meth:`Scheduler.join`): a session that needs the same step again and again (an LLM
  reply, a TTS reply, an ASR chunk) joins as a row. Every *tick* runs one batched step for the rows
  that have room for another output, so sessions join and leave between any two steps (continuous
  batching). Each row holds a bounded queue of outputs; a row whose consumer falls behind is not
  stepped until it catches up. :meth:`Scheduler.submit` is a row that leaves after one output.
- **Jobs** (:meth:`Scheduler.run`): one-off work for one session (an LLM prefill while the user
  speaks, a backchannel check, the start of a TTS reply). *Urgent* jobs (barge-in checks) run at the
  start of the next tick, before the step; the others after it, at most ``job_budget`` jobs per
  tick while rows are waiting, so a burst of listens never stalls a reply. A job runs whole in its
  tick: listens stay short because each prefills only the words new since the last one.

**The clock** (``clock``, seconds; the VAD's and the ASR's is :data:`CLOCK_S`, one 20 ms audio
block): a step whose rows come one at a time from many sessions (a VAD window, a few hundred
microseconds of compute against a millisecond of host overhead per tick) would otherwise tick once
per session per block, each at batch 1, and one core saturates at a few dozen sessions. A clocked
scheduler steps rows only at points of a grid of that period on the loop clock (``k * clock``:
every clocked scheduler of a period shares the grid, so the engines tick in lockstep), so the rows
that arrive between two points run as one batch. That costs a row up to one period of waiting
(half on average), so the grid applies only while more than one stream is stepping (a stream
counts for ``STREAM_SEEN`` periods after its last row, named by ``key`` in :meth:`Scheduler.join`);
never to a row submitted ``now`` (a stream catching up: the second chunk of one ASR feed), nor to
a row that has already waited past a point (behind a tick longer than the period). One session
alone never waits, and jobs and coalesced work never wait for the grid.

**Running ahead** (``ahead``, :class:`Ahead`; the LLM's and the TTS's, :mod:`duplex.engine.ahead`):
at the end of a tick the next step of the rows that go on, and whose consumers have room for one more
output, is launched before the tick returns, so the device computes it while the loop hands this
tick's outputs over and plans the next. A tick with jobs or coalesced work settles it first.

Scheduling is deadline-aware: when more rows are ready than ``max_batch``, the rows whose consumers
run dry soonest (the smallest ``deadline``, a loop time) go first. A step that raises is re-run for
each row alone (steps commit their state only after success, so a re-run is exact), and only the
rows that fail alone get the error: one session's failure never ends the others.

Everything here runs on the event loop, except ``step`` and the jobs, which run on the worker
thread, one tick (one executor job) at a time, so the virtual clock (:mod:`duplex.clock`) sees
every tick as compute in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from duplex.worker import ModelWorker

log = logging.getLogger(__name__)

S = TypeVar("S")
Out = TypeVar("Out")
T = TypeVar("T")


@dataclass(frozen=True)
class Output(Generic[Out]):
    """What a step made for one row: its value, and whether the row is finished (it leaves)."""

    value: Out
    done: bool = False


StepFn = Callable[[list[Any]], Sequence[Any]]  # states -> one Output, value or Exception per state


class _Later:
    """A step's output for a row that joins the next step instead of this one (nothing to hand out
    yet; the row stays and is stepped with the others)."""

    def __repr__(self) -> str:
        return "LATER"


LATER: Any = _Later()


@dataclass(frozen=True)
class Ahead:
    """How an engine runs its next step ahead (its rows' inputs are known once a step's outputs are
    booked, as an LLM's next token): ``launch(states)`` starts the next step of those rows without
    waiting for it, and the rows' outputs of it are kept with their states; the next tick's step
    reads it (one wait for the device), and ``settle()`` waits for it and books it when a tick must
    see every state committed first."""

    launch: Callable[[list[Any]], None]
    settle: Callable[[], None]

HISTORY = 4096  # ticks the scheduler remembers (benchmarks and tests read the latest)
STREAM_SEEN = 4  # clock periods a stream counts as stepping after its last row
CLOCK_S = 0.02  # the shared tick of the engines whose rows come per audio block (VAD, ASR): one 20 ms block


@dataclass(frozen=True)
class Tick:
    """One tick as it ran: rows stepped (0: jobs only), jobs run (urgent ones too), seconds on the worker."""

    rows: int
    jobs: int
    seconds: float


@dataclass(eq=False)
class Row(Generic[S, Out]):
    """One session's place in the batched step. Its ``state`` is read and updated by the step only
    (on the worker thread); the consumer takes outputs with :meth:`Scheduler.next`."""

    state: S
    deadline: float
    room: int  # outputs it may hold before its consumer takes them
    joined: float = 0.0  # loop time it joined
    hurry: bool = False  # step it at the next tick, whatever the clock (its stream is behind)
    queue: deque = field(default_factory=deque)  # Output values or one exception
    done: bool = False  # no more steps (finished, failed or left)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def wants_step(self) -> bool:
        return not self.done and len(self.queue) < self.room


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple
    future: asyncio.Future
    seq: int = 0  # order of submission, shared with coalesced items
    undo: Callable[[Any], Any] | None = None  # gives back what fn took, when its caller left meanwhile


BatchFn = Callable[[list[Any]], Sequence[Any]]  # items -> one result or Exception per item


@dataclass(eq=False)
class Coalesced:
    """One kind of work that many sessions ask for (an LLM listen), run for all of them together: at
    most once every ``period`` seconds, ``fn(items)`` on every item waiting, in one tick. Made by
    :meth:`Scheduler.coalesce`; :meth:`submit` queues an item."""

    scheduler: Scheduler
    fn: BatchFn
    period: float
    items: deque[tuple[Any, asyncio.Future, int]] = field(default_factory=deque)  # (item, future, seq)
    last: float = float("-inf")  # loop time of the last batch
    timer: asyncio.TimerHandle | None = None
    hurry: bool = False  # an item waiting wants the next tick, whatever the period
    batches: int = 0  # batches run so far
    handled: int = 0  # items they held

    def submit(self, item: Any, *, now: bool = False) -> asyncio.Future:
        """Queue ``item`` for the next batch of this kind; await the future for its result. ``now``:
        the batch runs in the next tick, the items waiting with it (a reply start, which the
        period must not delay, takes the listens waiting along)."""
        loop = self.scheduler._ensure_running()
        future = loop.create_future()
        self.items.append((item, future, self.scheduler._next_seq()))
        self.hurry = self.hurry or now
        self.scheduler._kick()
        return future


@dataclass(frozen=True)
class Plan:
    """What one tick does, decided on the event loop before the worker thread runs it (as vLLM's
    scheduler output is what its model runner executes): the ``urgent`` jobs, then one batched step
    of ``rows``, then each coalesced kind's waiting items (``batches``, one batch per kind), then the
    other ``jobs``. ``roomy``: per row, whether its consumer has room for one more output, so that
    an engine that runs ahead may launch its next step (:class:`Ahead`)."""

    urgent: tuple[_Job, ...] = ()
    rows: tuple[Row, ...] = ()
    batches: tuple[tuple[Coalesced, tuple[tuple[Any, asyncio.Future, int], ...]], ...] = ()
    jobs: tuple[_Job, ...] = ()
    roomy: tuple[bool, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.urgent or self.rows or self.batches or self.jobs)

    @property
    def states(self) -> list[Any]:
        return [row.state for row in self.rows]

    @property
    def work(self) -> list[tuple[Coalesced, list[Any]]]:
        """Each kind's items, as its batch function takes them."""
        return [(kind, [item for item, _, _ in items]) for kind, items in self.batches]

    def tick(self, seconds: float) -> Tick:
        return Tick(len(self.rows), len(self.urgent) + len(self.jobs) + len(self.batches), seconds)


class Scheduler(Generic[S, Out]):
    """Runs ``step`` over the rows that want one and jobs between steps, on one worker thread."""

    def __init__(self, name: str, step: StepFn, *, device: str = "cpu", max_batch: int = 32,
                 job_budget: int = 256, isolate_failures: bool = True, clock: float = 0.0,
                 ahead: Ahead | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if clock < 0:
            raise ValueError(f"clock must be >= 0 seconds, got {clock}")
        self.clock = clock  # > 0: rows step on a grid of this period while several streams step
        self.name = name
        self.worker = ModelWorker(name, device)
        self._step = step
        self.ahead = ahead
        self.max_batch = max_batch
        self.job_budget = job_budget
        self.isolate_failures = isolate_failures
        self._rows: list[Row] = []
        self._urgent: deque[_Job] = deque()
        self._jobs: deque[_Job] = deque()
        self._kinds: list[Coalesced] = []
        self._seq = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.history: deque[Tick] = deque(maxlen=HISTORY)  # the latest ticks, for benchmarks and tests
        self.ticks = 0  # ticks run so far
        self._streams: dict[object, float] = {}  # key -> loop time of its latest row (clocked only)
        self._point = -1  # the grid point (its index) the latest clocked tick ran at

    # -- rows --------------------------------------------------------------------------------------

    @property
    def active_rows(self) -> int:
        """Rows stepped now (each leaves when its stream closes)."""
        return len(self._rows)

    def join(self, state: S, *, deadline: float | None = None, room: int = 2, key: object = None,
             now: bool = False) -> Row[S, Out]:
        """Add a row; it is stepped from the next tick on (``key``: the stream it is of, which a
        clocked scheduler counts to know whether several streams are stepping; ``now``: the next
        tick runs at once, not at the clock's next point, as for a stream catching up)."""
        loop = self._ensure_running()
        t = loop.time()
        if self.clock and key is not None:
            self._streams[key] = t
        row: Row[S, Out] = Row(state=state, deadline=t if deadline is None else deadline, room=room, joined=t,
                               hurry=now)
        self._rows.append(row)
        self._kick()
        return row

    async def next(self, row: Row[S, Out]) -> Output[Out]:
        """The row's next output (raises what its step raised)."""
        while not row.queue:
            if row.done:
                raise RuntimeError(f"{self.name}: the row has left and has no more output")
            row.ready.clear()
            await row.ready.wait()
        item = row.queue.popleft()
        self._kick()  # room again: the row may be stepped
        if isinstance(item, BaseException):
            raise item
        return item

    def leave(self, row: Row) -> None:
        """Stop stepping ``row`` (a step in flight for it still lands, its output is dropped)."""
        row.done = True
        row.queue.clear()
        if row in self._rows:
            self._rows.remove(row)

    async def submit(self, state: S, *, deadline: float | None = None, key: object = None, now: bool = False) -> Out:
        """One step for ``state``, batched with whatever else is waiting (``key``, ``now``: see :meth:`join`)."""
        row = self.join(state, deadline=deadline, room=1, key=key, now=now)
        try:
            out = await self.next(row)
        finally:
            self.leave(row)
        return out.value

    def ticks_since(self, count: int) -> list[Tick]:
        """The ticks run after the first ``count`` (:attr:`ticks` read earlier), as far as the history reaches."""
        new = self.ticks - count
        return list(self.history)[-new:] if new > 0 else []

    def batch_sizes(self, since: int = 0) -> list[int]:
        """Rows of each step run after the first ``since`` ticks (ticks without a step left out)."""
        return [t.rows for t in self.ticks_since(since) if t.rows]

    # -- jobs --------------------------------------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any, urgent: bool = False,
            undo: Callable[[T], Any] | None = None) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` for the worker thread between steps (urgent: before the next step), in
        call order; await the returned future for its result (cancelling it drops a job not started).
        Coalesced items submitted before a job run before it.

        A job that takes something (a row of the engine) names its ``undo``: when the caller is
        cancelled while the job runs, no one receives the result, so ``undo(result)`` runs next, as a
        job of its own (a row taken for a reply that was stopped meanwhile is given back, not lost)."""
        loop = self._ensure_running()
        job = _Job(fn, args, loop.create_future(), self._next_seq(), undo)
        (self._urgent if urgent else self._jobs).append(job)
        self._kick()
        return job.future

    def coalesce(self, fn: BatchFn, period: float = 0.0) -> Coalesced:
        """A kind of work run for every session that asked, together: ``fn(items)`` once per tick at
        most every ``period`` seconds (sooner when a job submitted after an item waits behind it)."""
        kind = Coalesced(self, fn, period)
        self._kinds.append(kind)
        return kind

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- the loop ----------------------------------------------------------------------------------

    def _ensure_running(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError(f"{self.name}: the engine is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._wake = asyncio.Event()
            self._rows = []  # rows of an earlier loop cannot be served on this one
            self._streams, self._point = {}, -1  # nor is its clock this one's
            for kind in self._kinds:  # nor its coalesced items; and this loop's clock starts afresh
                kind.items.clear()
                kind.last, kind.timer, kind.hurry = float("-inf"), None, False
            self._task = loop.create_task(self._dispatch(), name=f"engine-{self.name}")
        return loop

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _plan(self) -> Plan:
        """The next tick's :class:`Plan`: the urgent jobs, the rows that want a step (soonest deadline
        first, at most ``max_batch``), the coalesced kinds that are due, the jobs within the budget."""
        urgent = [j for j in self._urgent if not j.future.done()]
        self._urgent.clear()
        ready = sorted((r for r in self._rows if r.wants_step), key=lambda r: r.deadline)[: self.max_batch]
        busy = bool(self._rows)  # rows are active: keep ticks short
        jobs: list[_Job] = []
        while self._jobs and not (busy and len(jobs) >= self.job_budget):
            job = self._jobs.popleft()
            if not job.future.done():  # done: its caller was cancelled while it waited
                jobs.append(job)
        assert self._loop is not None
        now = self._loop.time()
        batches = []
        for kind in self._kinds:
            items = [entry for entry in kind.items if not entry[1].done()]
            kind.items.clear()
            if not items:
                kind.hurry = False
                continue
            due = kind.last + kind.period
            if kind.timer is not None:
                kind.timer.cancel()
                kind.timer = None
            if kind.hurry or now >= due - 1e-6 or any(job.seq > items[0][2] for job in jobs):  # (timers may fire a hair early)
                kind.last, kind.hurry = now, False
                batches.append((kind, tuple(items)))
            else:  # wait for the clock (a job queued behind the items would have made them due)
                kind.items.extend(items)
                kind.timer = self._loop.call_at(due, self._kick)
        # a row runs ahead only if its consumer has room for that output too
        roomy = tuple(len(r.queue) + 1 < r.room for r in ready) if self.ahead is not None else ()
        return Plan(tuple(urgent), tuple(ready), tuple(batches), tuple(jobs), roomy)

    def _until_clock(self) -> float:
        """Seconds until the next point of the clock's grid when only rows are waiting, all of them
        since the last point and none in a hurry, and several streams are stepping; else 0 (step
        now: a row that has waited past a point, as behind a tick longer than the period, never
        waits again)."""
        if not self.clock or self._urgent or self._jobs or any(kind.items for kind in self._kinds):
            return 0.0
        waiting = [row for row in self._rows if row.wants_step]
        if not waiting or any(row.hurry for row in waiting):
            return 0.0
        assert self._loop is not None
        now = self._loop.time()
        seen = now - STREAM_SEEN * self.clock
        for key in [k for k, t in self._streams.items() if t < seen]:
            del self._streams[key]
        if len(self._streams) < 2:
            return 0.0
        index = max(math.ceil(now / self.clock - 1e-6), self._point + 1)  # one tick per point
        point = index * self.clock
        if min(row.joined for row in waiting) < point - self.clock - 1e-6:
            return 0.0
        if point - now > 1e-9:
            return point - now
        self._point = index  # the tick runs at this point now
        return 0.0

    async def _dispatch(self) -> None:
        try:
            await self._loop_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must fail the waiting sessions, never leave them hanging
            log.exception("%s: the scheduler failed", self.name)
            for row in self._rows:
                row.queue.append(exc)
                row.done = True
                row.ready.set()
            self._rows = []
            for future in self._drain():
                if not future.done():
                    future.set_exception(exc)

    async def _loop_forever(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            wait = self._until_clock()
            if wait > 0:  # the rows that arrive meanwhile join this tick; a job ends the wait
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            plan = self._plan()
            if not plan:
                await wake.wait()
                wake.clear()
                continue
            started = time.perf_counter()
            try:
                job_results, outputs, batch_results = await self.worker.run(self._tick, plan)
            except asyncio.CancelledError:
                for job in (*plan.urgent, *plan.jobs):
                    job.future.cancel()
                for _, items in plan.batches:
                    for _, future, _ in items:
                        future.cancel()
                raise
            self.history.append(plan.tick(time.perf_counter() - started))
            self.ticks += 1
            for (kind, items), results in zip(plan.batches, batch_results):
                kind.batches += 1
                kind.handled += len(items)
                for (_, future, _), result in zip(items, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            for job, (ok, value) in zip((*plan.urgent, *plan.jobs), job_results):
                if job.future.done():  # its caller left while it ran
                    if ok and job.undo is not None:
                        self.run(job.undo, value)
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)
            for row, out in zip(plan.rows, outputs):
                if row.done or out is LATER:  # left while its step ran; joins the next step
                    continue
                if not isinstance(out, (Output, BaseException)):
                    out = Output(out)  # a plain value: one output, the row goes on
                row.queue.append(out)
                if isinstance(out, BaseException) or out.done:
                    row.done = True
                    if row in self._rows:
                        self._rows.remove(row)
                row.ready.set()
            if plan.rows:
                await asyncio.sleep(0)  # let the consumers take their outputs (and make room) first

    def _tick(self, plan: Plan) -> tuple[list[tuple[bool, Any]], list[Any], list[list[Any]]]:
        """Worker thread: run ``plan``: urgent jobs, one batched step, the coalesced batches, then the
        other jobs; then (an engine that runs ahead) the next step of the rows that go on and whose
        consumers have room for it (``plan.roomy``) is launched, so the device computes it while the
        host hands these outputs over and plans the next tick. Jobs and coalesced work always see
        every state committed: a step launched ahead is settled first."""
        ahead = self.ahead
        urgent, states, work, jobs, roomy = plan.urgent, plan.states, plan.work, plan.jobs, plan.roomy
        if ahead is not None and (urgent or not states):
            self._settled(ahead)
        results = [_call(job) for job in urgent]
        outputs: list[Any] = []
        if states:
            outputs = self._isolated(self._step, states, "a batched step")  # it settles what ran ahead
        if ahead is not None and (work or jobs):
            self._settled(ahead)  # (a step that failed whole may have left it)
        batch_results = [self._isolated(kind.fn, items, "a coalesced batch") for kind, items in work]
        results += [_call(job) for job in jobs]
        if ahead is not None and states and not self._closed:
            going = [state for state, out, room in zip(states, outputs, roomy) if room
                     and not isinstance(out, BaseException) and not (isinstance(out, Output) and out.done)]
            if going:
                try:
                    ahead.launch(going)
                except Exception as exc:  # each row steps at the next tick instead (and fails there alone)
                    log.warning("%s: the step ahead of %d rows failed to launch (%s)", self.name, len(going), exc)
        return results, outputs, batch_results

    def _settled(self, ahead: Ahead) -> None:
        try:
            ahead.settle()
        except Exception as exc:  # the rows it held step again (and fail there alone)
            log.warning("%s: a step run ahead failed (%s)", self.name, exc)

    def _isolated(self, fn: BatchFn, states: list[Any], what: str) -> list[Any]:
        """``fn(states)``; if it raises, ``fn`` again for each state alone (it commits nothing before
        it succeeds), so only the states that fail alone get the error."""
        try:
            outputs = list(fn(states))
        except Exception as exc:
            if not self.isolate_failures or len(states) == 1:
                return [exc] * len(states)
            log.warning("%s: %s of %d rows failed (%s); re-running each row alone", self.name, what, len(states), exc)
        else:
            if len(outputs) == len(states):
                return outputs
            # a bug in fn; it committed its rows, so it is not re-run
            error = RuntimeError(f"{self.name}: {what} returned {len(outputs)} outputs for {len(states)} rows")
            return [error] * len(states)
        outputs = []
        for state in states:
            try:
                outputs.extend(fn([state]))
            except Exception as exc:  # this row's own failure
                outputs.append(exc)
        return outputs

    async def aclose(self) -> None:
        self._closed = True
        for row in self._rows:
            row.done = True
            row.ready.set()
        self._rows = []
        try:
            if self._task is not None:
                self._task.cancel()
                # the dispatcher's own cancellation is absorbed; a cancellation of the caller goes on
                await asyncio.gather(self._task, return_exceptions=True)
                self._task = None
        finally:  # cancelled or not, no job is left waiting and the worker thread stops
            for future in self._drain():
                future.cancel()
            self.worker.close()

    def _drain(self) -> list[asyncio.Future]:
        """Take every job and coalesced item still waiting; returns their futures."""
        futures = [job.future for job in (*self._urgent, *self._jobs)]
        self._urgent.clear()
        self._jobs.clear()
        for kind in self._kinds:
            futures += [future for _, future, _ in kind.items]
            kind.items.clear()
            if kind.timer is not None:
                kind.timer.cancel()
        return futures

    def close(self) -> None:
        """Stop the worker thread from outside a running loop (tests, shutdown)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self.worker.close()


def _call(job: _Job) -> tuple[bool, Any]:
    """Run a job handed to the worker (even if its caller was cancelled since: it lands whole)."""
    try:
        return True, job.fn(*job.args)
    except Exception as exc:
        return False, exc
