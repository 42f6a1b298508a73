"""The LLM stream's own decode loop: stopping, token limit, cancellation, and listening or judging a
backchannel while a reply is being generated."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from duplex.llm.speech_text import SpeechText
from duplex.llm.stream import TOKENS_AHEAD
from duplex.stages import Message
from llm_fixtures import (  # noqa: F401 (fixtures)
    SHORT_SYSTEM, make_llm, tiny_checkpoints, single_torch_thread,
)

DIALOGUE = [Message("user", "Tell me about the train to the city.")]


def greedy_tokens(llm, messages, n):
    """The first ``n`` greedy reply tokens, computed directly on a fresh context (no stop tokens)."""
    ctx = llm.new_context(SHORT_SYSTEM)
    logits = ctx.sync(messages, generation_prompt=True)
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = ctx.extend([out[-1]])
    ctx.close()
    return out


def spoken(llm, tokens):
    text = SpeechText()
    return text.feed(llm.engine.tokenizer.decode(tokens, skip_special_tokens=True)) + text.flush()


async def collect(stream, messages):
    return [piece async for piece in stream.reply(messages)]


async def test_reply_streams_until_the_token_limit(make_llm):
    """With no end-of-turn token sampled, a greedy reply is exactly max_reply_tokens tokens, streamed
    in pieces that join to the cleaned decode of those tokens."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=12, temperature=0.0)
    tokens = greedy_tokens(llm, DIALOGUE, 12)
    llm.format = dataclasses.replace(llm.format, stop_ids=frozenset(set(llm.format.stop_ids) - set(tokens)))
    stream = llm.new_stream(SHORT_SYSTEM)
    pieces = await collect(stream, DIALOGUE)
    assert len(pieces) > 1
    assert "".join(pieces) == spoken(llm, tokens)
    ctx = stream.context
    assert ctx.ids[ctx.dialogue.length:] == tokens[:11]  # the last sampled token is never run
    await stream.aclose()


async def test_reply_stops_at_the_end_of_turn_token(make_llm):
    """A sampled stop token ends the reply before it: the text is that of the tokens before it."""
    llm = make_llm("llama", window=256, max_reply_tokens=12, temperature=0.0)
    tokens = greedy_tokens(llm, DIALOGUE, 12)
    k = next(i for i in range(4, 12) if tokens[i] not in tokens[:i])
    llm.format = dataclasses.replace(llm.format, stop_ids=frozenset({tokens[k]}))
    stream = llm.new_stream(SHORT_SYSTEM)
    assert "".join(await collect(stream, DIALOGUE)) == spoken(llm, tokens[:k])
    ctx = stream.context
    assert ctx.ids[ctx.dialogue.length:] == tokens[:k]  # the stop token itself never entered the cache
    await stream.aclose()


async def test_fixed_length_replies_never_stop_early(make_llm):
    """With fixed_length (benchmarks), the stop token is never sampled: the reply that stopped at it
    now runs to max_reply_tokens."""
    llm = make_llm("llama", window=256, max_reply_tokens=12, temperature=0.0, fixed_length=True)
    tokens = greedy_tokens(llm, DIALOGUE, 12)
    llm.format = dataclasses.replace(llm.format, stop_ids=frozenset({tokens[4]}))
    stream = llm.new_stream(SHORT_SYSTEM)
    await collect(stream, DIALOGUE)
    ctx = stream.context
    generated = ctx.ids[ctx.dialogue.length:]
    assert len(generated) == 11 and tokens[4] not in generated
    await stream.aclose()


async def test_closing_or_cancelling_a_reply_stops_decoding(make_llm):
    """Closing the iterator, or cancelling the task that consumes it, stops the decode loop between
    steps: the step running at the close lands, no further one starts, the reply never ran more
    than a few tokens ahead of its consumer, and the stream keeps working."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=40, temperature=0.0)
    stream = llm.new_stream(SHORT_SYSTEM)
    async with contextlib.aclosing(stream.reply(DIALOGUE)) as reply:
        async for _ in reply:
            break
    await stream.model.scheduler.run(lambda: None)  # the step in flight at the close has landed
    ctx = stream.context
    length = ctx.length
    assert ctx.dialogue.length < length <= ctx.dialogue.length + 2 + TOKENS_AHEAD
    await asyncio.sleep(0.05)
    await stream.model.scheduler.run(lambda: None)
    assert ctx.length == length  # no step ran after the close
    p = await stream.listen(DIALOGUE + [Message("assistant", "Sure"), Message("user", "wait")])
    assert p is not None and ctx.end == ctx.dialogue.length  # listening works after the close

    started = asyncio.Event()

    async def consume():
        async for _ in stream.reply(DIALOGUE):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stream.model.scheduler.run(lambda: None)  # a step in flight when cancelled completes ...
    length = stream.context.length
    await asyncio.sleep(0.05)
    await stream.model.scheduler.run(lambda: None)
    assert stream.context.length == length  # ... but no further step is started
    await stream.aclose()


async def test_listening_and_backchannel_checks_leave_an_active_reply_unchanged(make_llm):
    """While a reply is generated, listen() and is_backchannel() score the user's words on top of
    the cache and roll back exactly: the cache goes on holding the reply's tokens only (the reply
    may decode on meanwhile) and the reply comes out token for token as without them."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=24, temperature=0.0)
    plain = llm.new_stream(SHORT_SYSTEM)
    expected = await collect(plain, DIALOGUE)
    stream = llm.new_stream(SHORT_SYSTEM)
    got = []
    async for piece in stream.reply(DIALOGUE):
        got.append(piece)
        if len(got) == 2:
            length, ids = stream.context.length, list(stream.context.ids)
            p = await stream.listen(DIALOGUE + [Message("user", "yeah")])
            assert 0.0 <= p <= 1.0
            assert isinstance(await stream.is_backchannel(DIALOGUE, "mm-hm"), bool)
            assert stream.context.length >= length and stream.context.ids[:length] == ids
    assert got == expected
    await plain.aclose()
    await stream.aclose()


async def test_backchannel_verdict_reads_the_yes_and_no_logits(make_llm):
    """The verdict compares the probabilities of "yes" and "no" answers to a scoring prompt (swapping
    them flips it), leaves the cache as it was, and skips the model for empty or long speech."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=16, temperature=0.0)
    stream = llm.new_stream(SHORT_SYSTEM)
    msgs = DIALOGUE + [Message("assistant", "The train leaves at nine.")]
    await stream.listen(msgs)
    ctx = stream.context
    state = (list(ctx.ids), ctx.logits.clone())
    verdict = await stream.is_backchannel(msgs, "right")
    assert (ctx.ids, ctx.logits.tolist()) == (state[0], state[1].tolist())
    yes, no = llm.answer_ids
    llm.answer_ids = (no, yes)
    assert await stream.is_backchannel(msgs, "right") is (not verdict)
    ran = ctx.prefilled
    assert await stream.is_backchannel(msgs, "") is True
    assert await stream.is_backchannel(msgs, "no no wait I meant the other one") is False
    assert ctx.prefilled == ran
    await stream.aclose()


async def test_sessions_keep_separate_caches(make_llm):
    """Two streams of one model interleave on its worker without touching each other's cache."""
    llm = make_llm("llama", window=256, max_reply_tokens=16)
    a, b = llm.new_stream(SHORT_SYSTEM), llm.new_stream("You are a pirate.")
    await asyncio.gather(a.listen([Message("user", "hello there")]), b.listen([Message("user", "good morning")]))
    ref = llm.new_stream(SHORT_SYSTEM)
    await ref.listen([Message("user", "hello there")])
    assert a.context.ids == ref.context.ids != b.context.ids
    for s in (a, b, ref):
        await s.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await a.listen([])


async def test_a_backchannel_check_waits_for_the_device_once(make_llm):
    """A barge-in's backchannel check (its question scored on top of the dialogue) reads the
    probabilities of "yes" and of "no" from one softmax in one host copy (it was one of each)."""
    from tests.graph_safety import HostSyncs

    llm = make_llm("qwen2", window=256, max_reply_tokens=4)
    stream = llm.new_stream(SHORT_SYSTEM)
    said = [Message("user", "tell me about the train")]
    await stream.listen(said)
    real, counts = stream._backchannel, []

    def counted(*args):
        with HostSyncs() as syncs:
            verdict = real(*args)
        counts.append(list(syncs.counts))
        return verdict

    stream._backchannel = counted
    verdict = await stream.is_backchannel(said, "uh huh")
    await stream.aclose()
    assert isinstance(verdict, bool) and len(counts) == 1 and len(counts[0]) == 1, counts
