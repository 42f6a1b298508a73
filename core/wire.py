"""The messages between a frontend and the engine core: length-prefixed pickles over a Unix socket.

A message is a tuple whose first item names it. Frontend to core: ``open`` a stage stream, ``call``
one of its coroutine methods, ``iter`` (make) one of its async iterators and ask it for the ``next``
item, ``aclose`` an iterator, ``cancel`` a request in flight, ask for a ``census`` of what is open or the
engines' ``ticks`` (for the benches), and answer a ``pull`` with a ``piece`` (an input the core's iterator reads from the frontend, e.g. the reply text the TTS speaks).
Core to frontend: ``hello`` (or ``failed``) once the models are loaded, then ``result``/``error`` of a
call, ``next`` or ``aclose`` (``stop``: the iterator is exhausted), and ``pull`` for a streamed
input. Requests carry an id of their own; streams and iterators are named by ids the frontend picks.
The socket lives in a directory only this user can open, and only the frontend that started the
core connects to it, so pickle carries numpy arrays and events as they are.

On the hot path (every audio block of every session is a call and an answer) each side batches:
a :class:`Sender` writes every message queued in one turn of the event loop as one write (one
system call, however many sessions' blocks and answers that turn made), and a :class:`Receiver`
reads what has arrived in one read and parses every whole message in it. :func:`write` and
:func:`read` move one message at a time, for the greetings and the workers' low-traffic calls.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("!I")  # the length of the pickle that follows
MAX_MESSAGE = 256 << 20  # a bound on one message (audio chunks are kilobytes)
READ_SIZE = 1 << 16  # what a Receiver asks the socket for at once


@dataclass(frozen=True)
class Streamed:
    """In a call's arguments: an async iterator that stays in the frontend; the core pulls its items."""

    feed: int


@dataclass(frozen=True)
class DialogueParts:
    """In a call's arguments: a :class:`~duplex.stages.Dialogue`; ``settled`` None means the one of
    the stream's previous dialogue (so it is sent once per change, and the LLM can tell it is the
    same, not once per ASR partial)."""

    settled: tuple[Any, ...] | None
    tail: tuple[Any, ...]


@dataclass(frozen=True)
class End:
    """A streamed input is exhausted."""


def frame(message: tuple[Any, ...]) -> bytes:
    """``message`` as it crosses the socket: its pickle's length, then the pickle."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def _size(header: bytes | bytearray | memoryview, offset: int = 0) -> int:
    (size,) = HEADER.unpack_from(header, offset)
    if size > MAX_MESSAGE:
        raise ValueError(f"engine core message of {size} bytes is over the {MAX_MESSAGE} byte bound")
    return size


def _message(body: bytes | memoryview) -> tuple[Any, ...]:
    message = pickle.loads(body)
    assert isinstance(message, tuple), message
    return message


async def read(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message, read alone (``asyncio.IncompleteReadError`` when the other side has gone).
    It takes exactly its own bytes, so a :class:`Receiver` may take over the stream after it."""
    size = _size(await reader.readexactly(HEADER.size))
    return _message(await reader.readexactly(size))


def write(writer: asyncio.StreamWriter, *message: Any) -> None:
    """Queue ``message`` on the socket at once (the transport's buffer)."""
    writer.write(frame(message))


TOTALS = {"messages": 0, "writes": 0}  # of every Sender in this process (the core's, over all its frontends)


class Sender:
    """Writes the messages queued in one turn of the event loop as one write, in the order queued.

    The first message of a turn schedules the write for the loop's next turn (``call_soon``), so a
    message waits at most for the callbacks already ready. :data:`TOTALS` counts the messages and
    writes (the benches read it). Queued messages of a closing socket are dropped, as a write would be.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._queued: list[bytes] = []

    def send(self, *message: Any) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self.flush)
        self._queued.append(frame(message))
        TOTALS["messages"] += 1

    def flush(self) -> None:
        """Write what is queued now (also before a close, so nothing queued is lost to it)."""
        if not self._queued:
            return
        data = b"".join(self._queued)
        self._queued.clear()
        if not self.writer.is_closing():
            self.writer.write(data)
            TOTALS["writes"] += 1


class Receiver:
    """Reads the messages a peer's :class:`Sender` writes: each read takes what has arrived (up to
    :data:`READ_SIZE`) and parses every whole message in it; :meth:`next` hands them out in order."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self._pending = bytearray()  # the start of a message not yet whole
        self._ready: deque[tuple[Any, ...]] = deque()

    async def next(self) -> tuple[Any, ...]:
        """The next message (``asyncio.IncompleteReadError`` when the other side has gone)."""
        while not self._ready:
            chunk = await self.reader.read(READ_SIZE)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(self._pending), None)
            self._pending += chunk
            self._parse()
        return self._ready.popleft()

    def _parse(self) -> None:
        data, start = self._pending, 0
        with memoryview(data) as view:
            while len(data) - start >= HEADER.size:
                size = _size(data, start)
                end = start + HEADER.size + size
                if end > len(data):
                    break
                with view[start + HEADER.size:end] as body:
                    self._ready.append(_message(body))
                start = end
        del data[:start]


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
