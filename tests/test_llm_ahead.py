"""The LLM's decode step run ahead: each tick launches the next step of the replies that go on before
it hands its tokens over, so on a GPU the device computes step k+1 while the host books step k,
passes its tokens to the sessions and plans the next tick (``Scheduler(ahead=...)``).

What must hold: the replies are token for token those made without running ahead (several sessions
joining and leaving at different steps, sampled with their seeds); a step is in flight whenever a
session takes a token in the steady state; one step is in flight at a time (rows that join wait
for the next launch); a reply closed while its next step runs
ahead leaves its cache as it was, and the stream's next reply is exact."""

from __future__ import annotations

import asyncio

from duplex.stages import Message
from llm_fixtures import SHORT_SYSTEM, make_llm, tiny_checkpoints, single_torch_thread  # noqa: F401
from step_log import in_flight, in_flight_when_taken, log_steps

ASKS = [("Tell me about the train.", 0.0), ("What is the weather like?", 0.2), ("Book a table for four.", 0.05)]


async def _replies(llm, delays: tuple[float, ...] = tuple(delay for _, delay in ASKS)) -> list[str]:
    """Three sessions' replies, each starting after its delay (joining while others decode)."""
    async def speak(text: str, delay: float) -> str:
        await asyncio.sleep(delay)
        stream = llm.new_stream(SHORT_SYSTEM)
        out = "".join([piece async for piece in stream.reply([Message("user", text)])])
        await stream.aclose()
        return out

    return list(await asyncio.gather(*(speak(text, delay) for (text, _), delay in zip(ASKS, delays))))


async def test_replies_run_ahead_are_the_replies_made_without(make_llm):
    """The same three sampled replies with the step run ahead and without it; with it, steps were
    launched ahead and one of them was in flight at most of the moments a session took a token."""
    settings = dict(window=192, max_reply_tokens=24, temperature=0.9, seed=7)
    plain = make_llm("qwen2", **settings)
    plain.scheduler.ahead = None
    expected = await _replies(plain)

    llm = make_llm("qwen2", **settings)
    log = log_steps(llm.run_ahead, llm.scheduler)
    got = await _replies(llm)
    assert got == expected and all(got)
    taken = in_flight_when_taken(log)
    assert sum(taken) >= 0.8 * len(taken), (sum(taken), len(taken))


async def test_rows_that_join_wait_for_the_next_launch_so_a_tick_launches_one_step(make_llm):
    """Sessions that join while others' step runs ahead are not launched beside it (that would read
    every weight twice in one tick): they join the launch made at the tick's end. So no two steps are
    ever in flight (tests/test_engine_syncs.py holds every step tick of a real conversation to one
    host sync)."""
    llm = make_llm("qwen2", window=192, max_reply_tokens=48, temperature=0.0, fixed_length=True)
    log = log_steps(llm.run_ahead, llm.scheduler)
    started = [asyncio.Event() for _ in ASKS]

    async def speak(i: int) -> str:  # each joins once the one before has said its first words
        if i:
            await started[i - 1].wait()
        stream = llm.new_stream(SHORT_SYSTEM)
        out = []
        async for piece in stream.reply([Message("user", ASKS[i][0])]):
            out.append(piece)
            started[i].set()
        await stream.aclose()
        return "".join(out)

    texts = await asyncio.gather(*(speak(i) for i in range(len(ASKS))))
    assert all(texts)
    assert all(0 <= n <= 1 for n in in_flight(log)), log
    assert max(n for kind, n in log if kind == "launch") == 3  # the three replies did share steps


async def test_a_reply_closed_while_its_step_runs_ahead_leaves_its_cache_as_it_was(make_llm):
    """A reply closed after its first words while its next step is in flight: the step is void (its
    token never reaches the cache or the reader), and the stream's next reply is the one a fresh stream
    with the same dialogue makes."""
    llm = make_llm("qwen2", window=192, max_reply_tokens=24, temperature=0.0)
    stream = llm.new_stream(SHORT_SYSTEM)
    reply = stream.reply([Message("user", "Tell me about the train.")])
    first = await reply.__anext__()
    assert llm.run_ahead.pending is not None  # its next step was launched before the token reached us
    ids = list(stream.context.ids)
    await reply.aclose()
    await llm.scheduler.run(lambda: None)  # a tick that settles what ran ahead
    assert llm.run_ahead.pending is None and list(stream.context.ids) == ids
    dialogue = [Message("user", "Tell me about the train."), Message("assistant", first.strip()),
                Message("user", "And the bus?")]
    again = "".join([p async for p in stream.reply(dialogue)])
    fresh = llm.new_stream(SHORT_SYSTEM)
    assert again == "".join([p async for p in fresh.reply(dialogue)])
    for s in (stream, fresh):
        await s.aclose()
    assert llm.engine.free_slots == llm.engine.slots
