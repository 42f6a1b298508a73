"""The engine core's process: loads the agent's models and serves their streams to its frontends.

:func:`main` is the child process's entry (``python -m duplex.core.process``, started by
:class:`duplex.core.remote.Core`): it listens
on the Unix socket it was given, loads and warms up the models (progress lines on stderr, as in one
process), greets the frontend with what it needs to know (``hello``: the TTS sample rate), and then
runs each call the frontend sends as a task of its own on its event loop, where the engines'
schedulers run too. More frontends may connect (``duplex serve --workers N``: each worker process is
one), all stepped by the same engines. It ends when the first frontend (the process that started it)
hangs up or has gone: every stream still open is closed, then the models.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import sys
from collections.abc import AsyncIterator
from typing import Any

from duplex.config import AgentConfig
from duplex.core import wire
from duplex.stages import Dialogue, Message

log = logging.getLogger(__name__)


class Connection:
    """One frontend's streams and the calls in flight on them (the core's side of the wire)."""

    def __init__(self, stages: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stages = stages
        self.receiver, self.sender = wire.Receiver(reader), wire.Sender(writer)
        self.streams: dict[int, Any] = {}
        self.iterators: dict[int, AsyncIterator[Any]] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}  # requests in flight, by request id
        self.nexts: dict[int, asyncio.Task[None]] = {}  # each iterator's latest next, by iterator id
        self.settled: dict[int, tuple[Message, ...]] = {}  # each LLM stream's last settled dialogue part
        self.pulls: dict[int, asyncio.Future[Any]] = {}  # a streamed input's item asked for, by feed
        self._pull_ids = itertools.count(1)

    async def serve(self) -> None:
        """Handle messages until the frontend hangs up, then close what it left open."""
        try:
            while True:
                try:
                    message = await self.receiver.next()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self._handle(*message)
        finally:
            await self._close_all()

    def _handle(self, kind: str, *args: Any) -> None:
        if kind == "open":
            sid, role, params = args
            self.streams[sid] = getattr(self.stages, role).new_stream(*params)
        elif kind == "call":
            rid, sid, method, params = args
            self._start(rid, self._call(rid, sid, method, self._arguments(sid, params)))
        elif kind == "iter":
            iid, sid, method, params = args
            self.iterators[iid] = getattr(self.streams[sid], method)(*self._arguments(sid, params))
        elif kind == "next":
            rid, iid = args
            self.nexts[iid] = self._start(rid, self._next(rid, iid))
        elif kind == "aclose":
            rid, iid = args
            self._start(rid, self._aclose(rid, iid))
        elif kind == "census":
            (rid,) = args
            self._send("result", rid, {"streams": len(self.streams), "iterators": len(self.iterators),
                                       "requests": len(self.tasks), "pulls": len(self.pulls)})
        elif kind == "ticks":
            from duplex.e2e import engine_ticks

            rid, since = args
            self._send("result", rid, {**engine_ticks(self.stages, since), "wire": wire.TOTALS.copy()})
        elif kind == "cancel":
            (rid,) = args
            task = self.tasks.get(rid)
            if task is not None:
                task.cancel()
        elif kind == "piece":
            pull, value = args
            future = self.pulls.pop(pull, None)
            if future is not None and not future.done():
                future.set_result(value)
        else:
            raise ValueError(f"unknown engine core message {kind!r}")

    def _arguments(self, sid: int, params: tuple[Any, ...]) -> tuple[Any, ...]:
        """The call's arguments as the stream takes them: streamed inputs become iterators that pull
        from the frontend, and a dialogue its :class:`~duplex.stages.Dialogue` again, with the settled
        part the same object as in the stream's last call when the frontend says it has not changed."""
        out = []
        for p in params:
            if isinstance(p, wire.Streamed):
                p = self._fed(p.feed)
            elif isinstance(p, wire.DialogueParts):
                settled = self.settled.get(sid) if p.settled is None else p.settled
                assert settled is not None, "a dialogue referred to a settled part never sent"
                self.settled[sid] = settled
                p = Dialogue(settled, p.tail)
            out.append(p)
        return tuple(out)

    def _start(self, rid: int, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks[rid] = task
        task.add_done_callback(lambda _: self.tasks.pop(rid, None))
        return task

    def _send(self, *message: Any) -> None:
        self.sender.send(*message)

    async def _call(self, rid: int, sid: int, method: str, params: tuple[Any, ...]) -> None:
        stream = self.streams[sid]
        try:
            value = await getattr(stream, method)(*params)
        except asyncio.CancelledError:
            raise  # the frontend stopped waiting: nothing to answer
        except Exception as exc:
            self._send("error", rid, wire.portable(exc))
            return
        finally:
            if method == "aclose":
                self.streams.pop(sid, None)
                self.settled.pop(sid, None)
        if method == "feed":  # a VAD's or ASR's: the samples the frontend may hold back before the next
            value = (value, stream.samples_short())
        self._send("result", rid, value)

    async def _next(self, rid: int, iid: int) -> None:
        try:
            value = await anext(self.iterators[iid])
        except StopAsyncIteration:
            self.iterators.pop(iid, None)
            self._send("stop", rid)
            return
        except asyncio.CancelledError:
            self.iterators.pop(iid, None)  # cancelled inside, as a cancelled anext() in one process
            raise
        except Exception as exc:
            self.iterators.pop(iid, None)
            self._send("error", rid, wire.portable(exc))
            return
        self._send("result", rid, value)

    async def _aclose(self, rid: int, iid: int) -> None:
        pending = self.nexts.pop(iid, None)
        if pending is not None and not pending.done():  # a generator closes only at rest
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        iterator = self.iterators.pop(iid, None)
        try:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()
        except Exception as exc:
            self._send("error", rid, wire.portable(exc))
            return
        self._send("result", rid, None)

    async def _fed(self, feed: int) -> AsyncIterator[Any]:
        """A streamed input: each item is pulled from the frontend when the consumer asks for it."""
        while True:
            pull = next(self._pull_ids)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.pulls[pull] = future
            self._send("pull", feed, pull)
            try:
                item = await future
            finally:
                self.pulls.pop(pull, None)
            if isinstance(item, wire.End):
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _close_all(self) -> None:
        running = list(self.tasks.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for future in self.pulls.values():
            future.cancel()
        for iterator in self.iterators.values():
            close = getattr(iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        for stream in self.streams.values():
            with contextlib.suppress(Exception):
                await stream.aclose()
        self.iterators.clear()
        self.streams.clear()


async def serve(config: AgentConfig, path: str, parent: int) -> None:
    """Listen on ``path``, load the models, then serve every frontend that connects: the first (the
    process that started the core) owns it, and when it hangs up (or its process has gone) every
    other frontend is cut off, their streams closed, then the models."""
    from duplex.agent import warm_up
    from duplex.profiles import build_stages

    loaded = asyncio.get_running_loop().create_future()  # the stages, or why they could not load
    owner: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # done when the owner hangs up
    serving: set[asyncio.Task[None]] = set()
    arrivals = itertools.count()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = next(arrivals) == 0
        try:
            stages = await asyncio.shield(loaded)
        except Exception as exc:
            wire.write(writer, "failed", wire.portable(exc))
            await writer.drain()
            writer.close()
            if first and not owner.done():
                owner.set_result(None)
            return
        wire.write(writer, "hello", {"tts_sample_rate": stages.tts.sample_rate, "pid": os.getpid(),
                                     "llm_calls_tools": bool(getattr(stages.llm, "calls_tools", False))})
        task = asyncio.current_task()
        assert task is not None
        serving.add(task)
        try:
            await Connection(stages, reader, writer).serve()
        finally:
            serving.discard(task)
            writer.close()
            if first and not owner.done():
                owner.set_result(None)

    server = await asyncio.start_unix_server(accept, path=path)
    watch = asyncio.create_task(_watch_parent(parent))
    stages = None
    try:
        try:
            stages = await asyncio.to_thread(build_stages, config)
            await warm_up(stages)
            loaded.set_result(stages)
        except Exception as exc:
            loaded.set_exception(exc)
        await asyncio.wait([owner, watch], return_when=asyncio.FIRST_COMPLETED)
        server.close()
        for task in list(serving):  # the others' streams close as their connections end
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
    finally:
        watch.cancel()
        server.close()
        if stages is not None:
            for role in ("vad", "asr", "llm", "tts"):
                close = getattr(getattr(stages, role), "aclose", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await close()


async def _watch_parent(parent: int) -> None:
    """Return when the process that started this one has gone (it was killed without closing us)."""
    while os.getppid() == parent:  # noqa: ASYNC110 (no event tells a process its parent died)
        await asyncio.sleep(1.0)


def main() -> None:
    """The child process's entry: ``python -m duplex.core.process SOCKET PARENT_PID``, the pickled
    :class:`~duplex.config.AgentConfig` on stdin."""
    logging.basicConfig(level=logging.WARNING, format="duplex core: %(levelname)s %(name)s: %(message)s")
    path, parent = sys.argv[1], int(sys.argv[2])
    config = pickle.load(sys.stdin.buffer)
    assert isinstance(config, AgentConfig), type(config)
    asyncio.run(serve(config, path, parent))


if __name__ == "__main__":
    main()
