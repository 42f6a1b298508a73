"""``duplex serve --workers N``: the sessions spread over N worker processes around one engine core.

Three kinds of process (see docs/DESIGN.md, "The engine core process"):

- the **engine core** (:mod:`duplex.core.process`): every model, stepping every session of every
  worker in the same batched ticks;
- **workers** (``python -m duplex.transport.workers``): each a :class:`~duplex.transport.server.Server`
  without HTTP of its own: its sessions, their aiortc peers (media flows between a browser and its
  worker directly, on the worker's own ICE candidates), turn-taking and records, on a GIL of its own.
  Its agent's stages are the core's (:meth:`duplex.core.remote.Core.connect`). It answers the front's
  signalling calls (``offer``, ``candidates``, ``capacity``, ``status``) over a Unix socket;
- the **front** (:class:`Front`, the ``duplex serve`` process): the page and the HTTP API with every
  check a single server makes (:class:`~duplex.transport.server.Site`), each new session placed on
  the worker with the most room and every follow-up sent to the worker its id names
  (:class:`duplex.cluster.routing.Router`, the cluster ingress's rules: ids read ``worker-1.<id>``).
  A ``/v1/realtime`` WebSocket is checked there too and relayed, message by message, to the worker
  with the most room, which serves it on its own HTTP (a Unix socket in a folder only this user
  reaches).

The front starts the core (and owns it: when the front ends, so does the core), then the workers,
which connect to it. A worker that dies takes its sessions with it (their pages are told and may
connect again, to another worker); the others go on, and the front starts it again (after
``RESTART_S``; longer while it keeps dying soon after it starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from duplex.cluster.routing import ReplicaDown, Router, cluster_status, placement
from duplex.config import AgentConfig
from duplex.core import wire
from duplex.transport.realtime_socket import MAX_MESSAGE
from duplex.transport.server import ApiResponse, ServerOptions, Site

log = logging.getLogger(__name__)

STOP_S = 5.0  # how long a closing worker may take before it is killed
RESTART_S = 5.0  # a worker that went is started again after this ...
RESTART_MAX_S = 60.0  # ... doubled, up to this, while it goes again within this of its start


@dataclass
class WorkerSetup:
    """What a worker process is told on its stdin."""

    config: AgentConfig
    options: ServerOptions  # each worker's own (max_sessions: per worker)
    core: str  # the engine core's socket
    front: str  # the front's socket
    name: str
    loopback: bool  # clients are on this machine: offer loopback ICE candidates too
    log_level: int  # duplex's loggers, as in the front
    http: str  # where its own HTTP listens (a Unix socket the front relays /v1/realtime to)


class Worker:
    """The front's side of one worker process: its calls, one request each, answered in any order."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, http: str = "",
                 on_gone: Callable[[Worker], None] | None = None) -> None:
        self.name, self.process = name, process
        self.http = http  # its HTTP's Unix socket (the front relays /v1/realtime there)
        self.on_gone = on_gone  # told when the worker goes on its own (not when the front hangs up)
        self.writer: asyncio.StreamWriter | None = None
        self.pid: int | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reading: asyncio.Task[None] | None = None
        self.gone = False
        self._closing = False  # the front hung up itself: its going is no news

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
        self.writer, self.pid = writer, pid
        self._reading = asyncio.create_task(self._read_loop(reader))

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        if self.gone or self.writer is None or self.writer.is_closing():
            raise ReplicaDown(f"worker {self.name} has exited")
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            wire.write(self.writer, "call", rid, method, args)
            return await future
        finally:
            self._waiting.pop(rid, None)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, rid, value = await wire.read(reader)
                future = self._waiting.get(rid)
                if future is None or future.done():
                    continue
                if kind == "error":
                    future.set_exception(value)
                else:
                    future.set_result(value)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.gone = True
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ReplicaDown(f"worker {self.name} has exited"))
            if not self._closing and self.on_gone is not None:
                self.on_gone(self)

    async def aclose(self) -> None:
        """Hang up (the worker closes its sessions, then exits) and wait for it, killing it after STOP_S."""
        self._closing = True
        if self.writer is not None and not self.writer.is_closing():
            self.writer.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class Launcher:
    """Starts worker processes, at first and again after one has gone: each is told its setup on
    stdin and says hello (or why it could not start) on the front's Unix socket."""

    def __init__(self, config: AgentConfig, options: ServerOptions, workers: int, core: str, *,
                 loopback: bool) -> None:
        import tempfile

        self.config, self.options, self.count, self.core, self.loopback = config, options, workers, core, loopback
        self.folder = tempfile.mkdtemp(prefix="duplex-front-")  # mode 0700: only this user reaches the socket
        self.path = os.path.join(self.folder, "front.sock")
        self.runtime = tempfile.mkdtemp(prefix="duplex-workers-")  # the workers' HTTP sockets
        self._starting: dict[str, tuple[Worker, asyncio.Future[None]]] = {}
        self._server: asyncio.AbstractServer | None = None

    async def listen(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=self.path)

    def seats(self, index: int) -> int:
        """Worker ``index``'s share of ``max_sessions``."""
        return self.options.max_sessions // self.count + (index < self.options.max_sessions % self.count)

    async def start(self, index: int) -> Worker:
        """Start ``worker-<index>`` and wait for its hello (raises what stopped it)."""
        from dataclasses import replace

        name = f"worker-{index}"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "duplex.transport.workers", str(os.getpid()), stdin=asyncio.subprocess.PIPE)
        worker = Worker(name, process, os.path.join(self.runtime, f"{name}.sock"))
        hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._starting[name] = (worker, hello)
        try:
            assert process.stdin is not None
            setup = WorkerSetup(self.config, replace(self.options, max_sessions=self.seats(index)), self.core,
                                self.path, name, self.loopback, logging.getLogger("duplex").getEffectiveLevel(),
                                worker.http)
            process.stdin.write(pickle.dumps(setup))
            await process.stdin.drain()
            process.stdin.close()
            await _started(worker, hello)
        except BaseException:
            await worker.aclose()
            raise
        finally:
            self._starting.pop(name, None)
        return worker

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind, name, payload = await wire.read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        if name not in self._starting or self._starting[name][1].done():
            writer.close()
            return
        worker, hello = self._starting[name]
        if kind == "failed":
            writer.close()
            hello.set_exception(payload)
            return
        worker.attach(reader, writer, int(payload["pid"]))
        hello.set_result(None)

    def close(self) -> None:
        import shutil

        if self._server is not None:
            self._server.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)


class Front(Site):
    """The page and the HTTP API of ``duplex serve --workers N`` (see the module docstring). A worker
    that goes is started again (its sessions are lost; the others go on), after ``RESTART_S``, or
    longer while it keeps going soon after each start."""

    def __init__(self, workers: dict[str, Worker], options: ServerOptions, launcher: Launcher | None = None) -> None:
        self.workers = workers
        self.router = Router(list(workers), self._call)
        self.launcher = launcher  # starts a worker that went (None: none is started again)
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._started_at = {name: time.monotonic() for name in workers}  # its latest start
        self._delays: dict[str, float] = {}  # the wait before its latest restart
        self._closing = False
        for worker in workers.values():
            worker.on_gone = self._gone
        super().__init__(options)

    def _gone(self, worker: Worker) -> None:
        if self._closing or self.launcher is None or worker.name in self._restarts:
            log.warning("worker %s has gone (exit code %s); its sessions have ended", worker.name,
                        worker.process.returncode)
            return
        self._restarts[worker.name] = asyncio.create_task(self._restart(worker.name))

    async def _restart(self, name: str) -> None:
        """Start ``name`` again after ``RESTART_S``, doubling the wait (up to ``RESTART_MAX_S``) while
        it keeps failing to start or going within ``RESTART_MAX_S`` of its start."""
        assert self.launcher is not None
        index = int(name.rsplit("-", 1)[1])
        last, ran = self._delays.get(name), time.monotonic() - self._started_at[name]
        delay = RESTART_S if last is None or ran >= RESTART_MAX_S else min(2 * last, RESTART_MAX_S)
        self._delays[name] = delay
        log.warning("worker %s has gone (exit code %s); its sessions have ended; starting it again in %.0f s",
                    name, self.workers[name].process.returncode, delay)
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    worker = await self.launcher.start(index)
                    break
                except Exception as exc:
                    delay = min(2 * delay, RESTART_MAX_S)
                    self._delays[name] = delay
                    log.warning("worker %s did not start again (%s: %s); trying in %.0f s", name,
                                type(exc).__name__, exc, delay)
            worker.on_gone = self._gone
            self.workers[name] = worker
            self._started_at[name] = time.monotonic()
            log.warning("worker %s is back (pid %s)", name, worker.pid)
        finally:
            self._restarts.pop(name, None)

    async def realtime(self, request):
        """``GET /v1/realtime``, checked here as on one server, then relayed to the worker with the most
        room (its own Server runs the conversation): the client's messages and the worker's, as they are."""
        import aiohttp

        ws, refused = self.realtime_upgrade(request)
        if refused is not None:
            return refused
        order = placement(await self.router.capacities())
        token = request.headers.get("Authorization")  # (the worker checks it again)
        headers = {"Authorization": token} if token else {}
        inner = session = None
        for name in order:  # a worker that filled up since it was asked says 503: try the next
            session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.workers[name].http))
            try:
                inner = await session.ws_connect("http://localhost/v1/realtime", headers=headers,
                                                 max_msg_size=MAX_MESSAGE)
                break
            except (aiohttp.ClientError, OSError) as exc:
                log.info("worker %s did not take a realtime session: %s", name, exc)
                await session.close()
                session = None
        if inner is None or session is None:
            return self._json(503, {"error": f"all {len(self.workers)} workers are full or down; try again later"},
                              headers={"Retry-After": "10"})
        await ws.prepare(request)
        try:
            await _relay(ws, inner)
        finally:
            await inner.close()
            await session.close()
        return ws

    async def _call(self, name: str, method: str, args: tuple[Any, ...]) -> Any:
        return await self.workers[name].call(method, args)

    async def offer(self, body: bytes, authorization: str | None = None, remote: str | None = None) -> ApiResponse:
        return await self.router.signal("POST", body, authorization, remote)

    async def candidates(self, body: bytes, authorization: str | None = None) -> ApiResponse:
        return await self.router.signal("PATCH", body, authorization, None)

    async def status_of(self, authorization: str | None = None) -> ApiResponse:
        return ApiResponse(200, cluster_status(await self.router.statuses(authorization)))

    async def sessions(self) -> dict[str, tuple[float, int]]:
        """Every worker's open sessions, by public id: input lag (s) and reply-audio gaps (for the benches)."""
        live = [w for w in self.workers.values() if not w.gone]
        answers = await asyncio.gather(*(w.call("sessions", ()) for w in live), return_exceptions=True)
        return {f"{w.name}.{pc_id}": value for w, answer in zip(live, answers)
                if isinstance(answer, dict) for pc_id, value in answer.items()}

    @classmethod
    async def start(cls, config: AgentConfig, options: ServerOptions, workers: int, *,
                    loopback: bool = False) -> tuple[Front, Any]:
        """Start the engine core (it loads the models) and ``workers`` worker processes sharing
        ``options.max_sessions`` seats; the front, and the core's connection (its owner: close the
        front's workers with :meth:`close`, then the core)."""
        if not 1 <= workers <= options.max_sessions:
            raise ValueError(f"{workers} workers need 1 to max_sessions ({options.max_sessions}) workers")

        from duplex.core.remote import Core

        core = await Core.start(config)
        launcher = Launcher(config, options, workers, core.path, loopback=loopback)
        started: list[Worker] = []
        try:
            await launcher.listen()
            starts = [asyncio.create_task(launcher.start(i)) for i in range(workers)]
            done = await asyncio.gather(*starts, return_exceptions=True)
            started = [w for w in done if isinstance(w, Worker)]
            for outcome in done:
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            await asyncio.gather(*(w.aclose() for w in started), return_exceptions=True)
            await core.aclose()
            launcher.close()
            raise
        return cls({w.name: w for w in started}, options, launcher), core

    async def close(self) -> None:
        """Every worker closes its sessions and exits (the app's shutdown runs this); none starts again."""
        self._closing = True
        for task in list(self._restarts.values()):
            task.cancel()
        await asyncio.gather(*self._restarts.values(), return_exceptions=True)
        await asyncio.gather(*(w.aclose() for w in self.workers.values()))
        if self.launcher is not None:
            self.launcher.close()


async def _relay(outer: Any, inner: Any) -> None:
    """Pass text and binary messages both ways between the client's WebSocket and the worker's until
    either side closes; then close the other."""
    from aiohttp import WSMsgType

    async def pump(source: Any, sink: Any) -> None:
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            else:
                break

    tasks = [asyncio.create_task(pump(outer, inner)), asyncio.create_task(pump(inner, outer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ws in (outer, inner):
            with contextlib.suppress(Exception):
                await ws.close()


async def _started(worker: Worker, hello: asyncio.Future[Any]) -> None:
    """Wait for ``worker``'s hello (or the error that stopped it), or for it to exit before it said one."""
    exited = asyncio.create_task(worker.process.wait())
    await asyncio.wait([hello, exited], return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    if hello.done():
        hello.result()  # raises the worker's error
        return
    raise RuntimeError(f"worker {worker.name} exited (code {worker.process.returncode}) before it started; "
                       "its error is above")


# -- the worker process ---------------------------------------------------------------------------


async def _serve_worker(setup: WorkerSetup, parent: int) -> None:
    """Connect to the core, build the agent and its server, then answer the front's calls until it hangs up."""
    from duplex.agent import Agent
    from duplex.core.remote import Core
    from aiohttp import web

    from duplex.transport.server import Server, log_loop_errors

    if setup.loopback:
        from duplex.transport.ice import allow_loopback_candidates

        allow_loopback_candidates()
    reader, writer = await asyncio.open_unix_connection(setup.front)
    try:
        core = await Core.connect(setup.core)
        agent = Agent(core.stages(), setup.config, core)
        server = Server(agent, setup.options)
        await log_loop_errors(server.app)  # aiortc's own tasks failing: one WARNING line, as in one process
        runner = web.AppRunner(server.app, access_log=None)  # only the front reaches it (/v1/realtime relayed)
        await runner.setup()
        await web.UnixSite(runner, setup.http).start()
    except Exception as exc:
        wire.write(writer, "failed", setup.name, wire.portable(exc))
        await writer.drain()
        writer.close()
        return
    wire.write(writer, "hello", setup.name, {"pid": os.getpid()})
    calls: set[asyncio.Task[None]] = set()

    async def answer(rid: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            value = await _method(server, method, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("worker %s: %s failed", setup.name, method)
            if not writer.is_closing():
                wire.write(writer, "error", rid, wire.portable(exc))
            return
        if not writer.is_closing():
            wire.write(writer, "result", rid, value)

    watch = asyncio.create_task(_watch_parent(parent))
    try:
        while not watch.done():
            reading = asyncio.ensure_future(wire.read(reader))
            await asyncio.wait([reading, watch], return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                break
            try:
                _, rid, method, args = reading.result()
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the front has hung up: stop
            task = asyncio.create_task(answer(rid, method, args))
            calls.add(task)
            task.add_done_callback(calls.discard)
    finally:
        watch.cancel()
        for task in list(calls):
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await server.close()
        await runner.cleanup()
        await agent.aclose()
        writer.close()


async def _method(server: Any, method: str, args: tuple[Any, ...]) -> Any:
    """One signalling call of the front, answered by this worker's server."""
    if method == "offer":
        return await server.offer(*args)
    if method == "candidates":
        return await server.candidates(*args)
    if method == "capacity":
        (session,) = args
        return {"ready": True, "free": server.room(), "holds": session is not None and server.holds(session)}
    if method == "sessions":
        return {pc_id: (p.session.lag_s, p.session.playout.underruns) for pc_id, p in list(server.peers.items())}
    if method == "status":
        (authorization,) = args
        body = server.status_body(authorization).body
        return {**body, "pid": os.getpid()}
    raise ValueError(f"unknown worker call {method!r}")


async def _watch_parent(parent: int) -> None:
    """Return when the front's process has gone (killed without closing its workers)."""
    while os.getppid() == parent:  # noqa: ASYNC110 (no event tells a process its parent died)
        await asyncio.sleep(1.0)


def main() -> None:
    """A worker's entry: ``python -m duplex.transport.workers PARENT_PID``, its :class:`WorkerSetup`
    pickled on stdin."""
    parent = int(sys.argv[1])
    setup = pickle.load(sys.stdin.buffer)
    assert isinstance(setup, WorkerSetup), type(setup)
    logging.basicConfig(level=logging.WARNING, format=f"duplex {setup.name}: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("duplex").setLevel(setup.log_level)
    asyncio.run(_serve_worker(setup, parent))


if __name__ == "__main__":  # run as the module itself, so the pickled WorkerSetup is this module's class
    from duplex.transport.workers import main as worker_main

    worker_main()
