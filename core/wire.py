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
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("!I")  # the length of the pickle that follows
MAX_MESSAGE = 256 << 20  # a bound on one message (audio chunks are kilobytes)


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


async def read(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message (``asyncio.IncompleteReadError`` when the other side has gone)."""
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_MESSAGE:
        raise ValueError(f"engine core message of {size} bytes is over the {MAX_MESSAGE} byte bound")
    message = pickle.loads(await reader.readexactly(size))
    assert isinstance(message, tuple), message
    return message


def write(writer: asyncio.StreamWriter, *message: Any) -> None:
    """Queue ``message`` on the socket (the transport's buffer; callers that send much ``drain``)."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(HEADER.pack(len(body)) + body)


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
