"""The frontend's side of the engine core: stages whose streams forward every call to the core process.

:meth:`Core.start` spawns the core (:mod:`duplex.core.process`) with the agent's config, waits while it
loads (its progress lines go to the same stderr), and returns the connection; :meth:`Core.stages` are
:class:`~duplex.stages.Stages` a :class:`~duplex.session.Session` uses as it uses local ones. Every
stream call is one request; an async iterator (an LLM reply, a TTS reply's audio) is asked for one
item at a time, so the engines still run only as far ahead of the session as in one process, and a
reply the session closes is closed in the core. Cancelling a call cancels it in the core. When the
core process dies, every call in flight and every later one raises :class:`CoreGone` (the session
that made it ends with an error event; the server goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from duplex.config import AgentConfig
from duplex.core import wire
from duplex.events import TranscriptFinal, TranscriptPartial, VADEvent
from duplex.stages import AudioChunk, Dialogue, Message, Stages

STOP_S = 5.0  # how long a closing core may take before it is killed


class CoreGone(RuntimeError):
    """The engine core process has exited: no model call can be answered."""


class Core:
    """A connection to the engine core process. The one made by :meth:`start` owns the process too
    (:meth:`aclose` ends both); one made by :meth:`connect` (a ``duplex serve`` worker's) only hangs up."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: dict[str, Any],
                 process: asyncio.subprocess.Process | None = None, folder: str | None = None) -> None:
        self.path = path  # the core's socket: more frontends connect to it
        self.process, self.folder = process, folder
        self.writer = writer
        self.receiver, self.sender = wire.Receiver(reader), wire.Sender(writer)  # after the greeting, read alone
        self.info = info
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[str, Any]]] = {}
        self._feeds: dict[int, AsyncIterator[Any]] = {}  # streamed inputs the core pulls from
        self._pulling: dict[int, asyncio.Task[None]] = {}
        self.gone: CoreGone | None = None
        self._reading = asyncio.create_task(self._read_loop())

    @classmethod
    async def start(cls, config: AgentConfig) -> Core:
        """Spawn the core with ``config``, wait until its models are loaded and warm, and connect."""
        folder = tempfile.mkdtemp(prefix="duplex-core-")  # mode 0700: only this user reaches the socket
        path = os.path.join(folder, "core.sock")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "duplex.core.process", path, str(os.getpid()), stdin=asyncio.subprocess.PIPE)
        try:
            assert process.stdin is not None
            process.stdin.write(pickle.dumps(config))
            await process.stdin.drain()
            process.stdin.close()
            while True:
                if process.returncode is not None:
                    raise CoreGone(f"the engine core process exited (code {process.returncode}) before it "
                                   "listened; its error is above")
                try:
                    reader, writer = await asyncio.open_unix_connection(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)
            info = await _greeting(reader, writer)
            return cls(path, reader, writer, info, process, folder)
        except BaseException:
            await _stop(process)
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @classmethod
    async def connect(cls, path: str) -> Core:
        """Another frontend's connection to the core listening on ``path`` (started by :meth:`start`)."""
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            raise CoreGone(f"cannot reach the engine core at {path}: {exc}") from None
        return cls(path, reader, writer, await _greeting(reader, writer))

    def stages(self) -> Stages:
        """The four stages, served by this core."""
        rate = int(self.info["tts_sample_rate"])
        llm = RemoteModel(self, "llm", RemoteLLMStream)
        llm.calls_tools = bool(self.info.get("llm_calls_tools", False))  # its tool calls cross the socket
        return Stages(vad=RemoteModel(self, "vad", RemoteVADStream), asr=RemoteModel(self, "asr", RemoteASRStream),
                      llm=llm,
                      tts=RemoteModel(self, "tts", RemoteTTSStream, sample_rate=rate))

    # -- requests ----------------------------------------------------------------------------------

    def send(self, *message: Any) -> None:
        if self.gone is not None:
            raise self.gone
        self.sender.send(*message)

    def new_id(self) -> int:
        return next(self._ids)

    async def request(self, kind: str, *args: Any) -> tuple[str, Any]:
        """Send ``(kind, request id, *args)`` and wait for its answer (``result`` or ``stop``, and the
        value); an ``error`` raises. Cancelled, it cancels the request in the core."""
        rid = self.new_id()
        future: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            self.send(kind, rid, *args)
            return await future
        except asyncio.CancelledError:
            if self.gone is None and not future.done():
                self.send("cancel", rid)
            raise
        finally:
            self._waiting.pop(rid, None)

    async def census(self) -> dict[str, int]:
        """What is open in the core: streams, iterators, requests in flight, streamed inputs waited on."""
        return (await self.request("census"))[1]

    async def engine_ticks(self, since: dict[str, int] | None) -> dict[str, Any]:
        """The core's :func:`duplex.e2e.engine_ticks`: its engines' tick counts, the ticks since
        ``since`` and the LLM's listen count."""
        return (await self.request("ticks", since))[1]

    async def call(self, sid: int, method: str, params: tuple[Any, ...]) -> Any:
        return (await self.request("call", sid, method, params))[1]

    def feed(self, source: AsyncIterator[Any]) -> wire.Streamed:
        """Serve ``source`` to the core, an item each time it pulls one."""
        fid = self.new_id()
        self._feeds[fid] = source
        return wire.Streamed(fid)

    async def end_feed(self, feed: wire.Streamed) -> None:
        """Stop serving ``feed`` (its iterator is left to its owner), waiting for a pull in progress."""
        self._feeds.pop(feed.feed, None)
        task = self._pulling.pop(feed.feed, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _pull(self, fid: int, pull: int) -> None:
        source = self._feeds.get(fid)
        value: Any
        if source is None:
            value = wire.End()
        else:
            try:
                value = await anext(source)
            except StopAsyncIteration:
                value = wire.End()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                value = wire.portable(exc)
        with contextlib.suppress(CoreGone):
            self.send("piece", pull, value)
        if self._pulling.get(fid) is asyncio.current_task():
            del self._pulling[fid]

    async def _read_loop(self) -> None:
        try:
            while True:
                kind, *args = await self.receiver.next()
                if kind == "pull":
                    fid, pull = args
                    self._pulling[fid] = asyncio.create_task(self._pull(fid, pull))
                    continue
                rid, value = args if len(args) == 2 else (args[0], None)
                future = self._waiting.get(rid)
                if future is None or future.done():
                    continue  # cancelled here meanwhile
                if kind == "error":
                    assert isinstance(value, BaseException)
                    future.set_exception(value)
                else:
                    future.set_result((kind, value))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            code = self.process.returncode if self.process is not None else None
            self.gone = CoreGone("the engine core process has gone" + (f" (exit code {code})" if code is not None
                                                                         else ""))
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(self.gone)

    async def aclose(self) -> None:
        """Hang up (the core closes this connection's streams) and, when this connection owns the
        process, wait for it (it closes every other frontend's streams and the models, then exits)."""
        if not self.writer.is_closing():
            self.sender.flush()
            self.writer.close()
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)
        if self.process is not None:
            await _stop(self.process)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


async def _greeting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
    """The core's ``hello`` once its models are loaded and warm (what a frontend needs to know), or
    the error that stopped them loading."""
    try:  # loading takes minutes on a GPU: wait as long as the core lives (it hangs up if it dies)
        kind, payload = await wire.read(reader)
    except asyncio.IncompleteReadError:
        writer.close()
        raise CoreGone("the engine core process exited while loading; its error is above") from None
    if kind == "failed":
        writer.close()
        raise payload
    return payload


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Wait for the core to exit (it does once the connection is gone), killing it after STOP_S."""
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), STOP_S)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


class RemoteModel:
    """One role of the core's stages: opens streams there (the agent closes the core, not its models)."""

    def __init__(self, core: Core, role: str, stream: type[RemoteStream], sample_rate: int | None = None) -> None:
        self.core, self.role, self._stream = core, role, stream
        self.calls_tools = False  # (the LLM's: set from the core's hello)
        if sample_rate is not None:
            self.sample_rate = sample_rate

    def new_stream(self, *params: Any) -> Any:
        return self._stream(self, params)


class RemoteStream:
    """A stage stream in the core, named by the id this side gave it."""

    def __init__(self, model: RemoteModel, params: tuple[Any, ...]) -> None:
        self.core = model.core
        self.sid = self.core.new_id()
        self.core.send("open", self.sid, model.role, params)

    async def _call(self, method: str, *params: Any) -> Any:
        return await self.core.call(self.sid, method, params)

    async def aclose(self) -> None:
        if self.core.gone is None:
            await self._call("aclose")


class RemoteIterator:
    """An async iterator in the core (a reply's text, a reply's audio), one item per request."""

    def __init__(self, core: Core, sid: int, method: str, params: tuple[Any, ...],
                 feed: wire.Streamed | None = None) -> None:
        self.core, self.feed = core, feed
        self.iid = core.new_id()
        self.done = False
        core.send("iter", self.iid, sid, method, params)

    def __aiter__(self) -> RemoteIterator:
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        try:
            kind, value = await self.core.request("next", self.iid)
        except BaseException:
            self.done = True  # raised or cancelled inside the core's iterator: it is finished there too
            raise
        if kind == "stop":
            self.done = True
            raise StopAsyncIteration
        return value

    async def aclose(self) -> None:
        if self.feed is not None:
            await self.core.end_feed(self.feed)
        if self.core.gone is None:
            await self.core.request("aclose", self.iid)
        self.done = True


class _HeldFeed(RemoteStream):
    """A VAD's or ASR's stream in the core, fed audio that it only buffers until a window or chunk is
    whole: each answer says how many samples are still missing before the next feed does work
    (``samples_short``, the core's stream owns the count), and blocks that add up to fewer stay here
    and go with the next block, so a session that listens sends about one feed per window or chunk,
    not one per 20 ms block. Nothing is late: the core would have done nothing with them sooner."""

    def __init__(self, model: RemoteModel, params: tuple[Any, ...]) -> None:
        super().__init__(model, params)
        self._held: list[np.ndarray] = []
        self._held_samples = 0
        self._short = 0  # samples the core's stream still misses before a feed does work (0: unknown yet)

    def samples_short(self) -> int:
        return max(1, self._short - self._held_samples)

    async def _feed(self, pcm: np.ndarray, *more: Any, hold: bool = True) -> list[Any]:
        self._held.append(pcm)
        self._held_samples += len(pcm)
        if hold and self._held_samples < self._short:
            return []
        events, self._short = await self._call("feed", self._take(), *more)
        return events

    def _take(self) -> np.ndarray:
        held = self._held[0] if len(self._held) == 1 else np.concatenate(self._held)
        self._held, self._held_samples = [], 0
        return held


class RemoteVADStream(_HeldFeed):
    async def feed(self, pcm: np.ndarray, peek: bool = False) -> list[VADEvent]:
        return await self._feed(pcm, peek, hold=not peek)  # a peek looks at the newest audio: sent at once


class RemoteASRStream(_HeldFeed):
    async def feed(self, pcm: np.ndarray) -> list[TranscriptPartial | TranscriptFinal]:
        return await self._feed(pcm)

    async def endpoint(self) -> list[TranscriptFinal]:
        if self._held:  # the audio held back first (fewer samples than a chunk: its feed finds nothing)
            events, self._short = await self._call("feed", self._take())
            assert not events, events
        return await self._call("endpoint")


class RemoteLLMStream(RemoteStream):
    def __init__(self, model: RemoteModel, params: tuple[Any, ...]) -> None:
        super().__init__(model, params)
        self._settled: tuple[Message, ...] | None = None  # the settled part the core holds for this stream

    def _dialogue(self, messages: Sequence[Message]) -> Any:
        """``messages`` for the wire: a dialogue's settled part only when it is not the last one sent."""
        if not isinstance(messages, Dialogue):
            return tuple(messages)
        same = messages.settled is self._settled
        self._settled = messages.settled
        return wire.DialogueParts(None if same else messages.settled, messages.tail)

    async def listen(self, messages: Sequence[Message]) -> float | None:
        return await self._call("listen", self._dialogue(messages))

    def reply(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        return RemoteIterator(self.core, self.sid, "reply", (self._dialogue(messages),))

    async def is_backchannel(self, messages: Sequence[Message], text: str) -> bool:
        return await self._call("is_backchannel", self._dialogue(messages), text)

    async def configure(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> None:
        await self._call("configure", system_prompt, tuple(tools))


class RemoteTTSStream(RemoteStream):
    def __init__(self, model: RemoteModel, params: tuple[Any, ...]) -> None:
        super().__init__(model, params)
        self.sample_rate: int = model.sample_rate

    def synthesize(self, text: AsyncIterator[str]) -> AsyncIterator[AudioChunk]:
        feed = self.core.feed(text)
        return RemoteIterator(self.core, self.sid, "synthesize", (feed,), feed=feed)
