"""The engine core's wire batches without changing what crosses it.

- Every message queued in one turn of the event loop leaves in one socket write, and the other side
  reads them all, in the order queued, with numpy arrays and events as they were.
- Messages whose bytes arrive in pieces that cut them anywhere (a header split, a body split, many
  messages in one piece) are parsed whole and in order.
- A peer that hangs up ends the reading with ``IncompleteReadError`` (what the core and the frontend
  take as "gone"), a length over the bound is refused, and a single message read alone leaves the
  rest of the stream to a Receiver.
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from duplex.core import wire
from duplex.events import SpeechStarted


async def _pair() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter]:
    """A real Unix socket pair: a reader on one end, a writer on the other (and the reader's writer)."""
    a, b = socket.socketpair(socket.AF_UNIX)
    reader, reader_side = await asyncio.open_unix_connection(sock=a)
    _, writer = await asyncio.open_unix_connection(sock=b)
    return reader, writer, reader_side


def test_one_turns_messages_leave_in_one_write_and_arrive_in_order():
    async def main():
        reader, writer, other = await _pair()
        sender, receiver = wire.Sender(writer), wire.Receiver(reader)
        pcm = np.arange(320, dtype=np.float32) / 7
        before = wire.TOTALS.copy()
        for i in range(50):
            sender.send("call", i, 3, "feed", (pcm + i, False))
        sender.send("result", 99, [SpeechStarted(stream_samples=24000, wall=1.5, start=16000)])
        await asyncio.sleep(0)  # the loop's next turn writes them
        await asyncio.sleep(0)
        assert wire.TOTALS["writes"] - before["writes"] == 1
        assert wire.TOTALS["messages"] - before["messages"] == 51
        got = [await receiver.next() for _ in range(51)]
        assert [m[1] for m in got[:50]] == list(range(50))
        for i, m in enumerate(got[:50]):
            np.testing.assert_array_equal(m[4][0], pcm + i)
            assert m[4][0].dtype == np.float32
        assert got[50] == ("result", 99, [SpeechStarted(stream_samples=24000, wall=1.5, start=16000)])
        # a later turn is a write of its own
        sender.send("stop", 100)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert wire.TOTALS["writes"] - before["writes"] == 2
        assert await receiver.next() == ("stop", 100)
        writer.close()
        other.close()

    asyncio.run(main())


@pytest.mark.parametrize("piece", [1, 3, 5, 64, 1 << 20])
def test_messages_cut_anywhere_are_parsed_whole_and_in_order(piece):
    async def main():
        messages = [("call", i, i % 3, "feed", (np.full(i, i, np.int16), i % 2 == 0)) for i in range(40)]
        data = b"".join(wire.frame(m) for m in messages)
        reader = asyncio.StreamReader()
        receiver = wire.Receiver(reader)

        async def arrive():
            for start in range(0, len(data), piece):
                reader.feed_data(data[start:start + piece])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeding = asyncio.create_task(arrive())
        got = [await receiver.next() for _ in messages]
        await feeding
        for m, g in zip(messages, got, strict=True):
            assert g[:4] == m[:4] and g[4][1] == m[4][1]
            np.testing.assert_array_equal(g[4][0], m[4][0])
        with pytest.raises(asyncio.IncompleteReadError):  # the peer hung up after its last message
            await receiver.next()

    asyncio.run(main())


def test_a_hang_up_mid_message_and_an_oversized_length_are_errors():
    async def main():
        reader = asyncio.StreamReader()
        data = wire.frame(("result", 1, "x" * 100))
        reader.feed_data(data[:-10])
        reader.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await wire.Receiver(reader).next()

        reader = asyncio.StreamReader()
        reader.feed_data(wire.HEADER.pack(wire.MAX_MESSAGE + 1) + b"\0" * 16)
        with pytest.raises(ValueError, match="over the"):
            await wire.Receiver(reader).next()

    asyncio.run(main())


def test_a_message_read_alone_leaves_the_rest_to_a_receiver():
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(wire.frame(("hello", {"pid": 1})) + wire.frame(("result", 2, None)))
        assert await wire.read(reader) == ("hello", {"pid": 1})  # the greeting, read alone
        assert await wire.Receiver(reader).next() == ("result", 2, None)

    asyncio.run(main())
