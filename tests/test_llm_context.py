"""Following the dialogue: incremental listening, rollback, the heard prefix after an interruption,
eviction at message boundaries, and the end-of-turn estimate."""

from __future__ import annotations

import contextlib

import pytest
import torch

from duplex.stages import Message
from llm_fixtures import (  # noqa: F401 (fixtures)
    ARCHS, SHORT_SYSTEM, make_llm, max_kv_diff, tiny_checkpoints, single_torch_thread,
)

SENTENCE = "could you tell me the weather for tomorrow in the city near the river"


@pytest.mark.parametrize("arch", ARCHS)
async def test_incremental_prefill_equals_one_prefill(make_llm, arch):
    """Listening to the user's words one partial at a time leaves the cache, the logits and the
    end-of-turn estimate equal to one prefill of the whole message, and runs each token about once."""
    llm = make_llm(arch, window=512, max_reply_tokens=16)
    history = [Message("user", "Hello there."), Message("assistant", "Hi! What can I do for you?")]
    words = SENTENCE.split()
    inc, whole = llm.new_stream(SHORT_SYSTEM), llm.new_stream(SHORT_SYSTEM)
    for i in range(1, len(words) + 1):
        p_inc = await inc.listen(history + [Message("user", " ".join(words[:i]))])
    p_whole = await whole.listen(history + [Message("user", SENTENCE)])
    a, b = inc.context, whole.context
    assert a.ids == b.ids
    assert max_kv_diff(a, b) < 1e-5
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert p_inc == pytest.approx(p_whole, abs=1e-6)
    # Each new word re-runs at most the last token or two of the previous partial.
    assert a.prefilled <= b.prefilled + 2 * len(words)
    await inc.aclose()
    await whole.aclose()


@pytest.mark.parametrize("arch", ARCHS)
async def test_truncate_then_reprefill_equals_never_prefilled(make_llm, arch):
    """A revised partial rolls the cache back to the common prefix: afterwards it is the cache of a
    session that never saw the dropped words, and only the new tail was run."""
    llm = make_llm(arch, window=512, max_reply_tokens=16)
    revised, direct = llm.new_stream(SHORT_SYSTEM), llm.new_stream(SHORT_SYSTEM)
    await revised.listen([Message("user", "I want to book a table for two on Friday evening")])
    before = revised.context.prefilled
    await revised.listen([Message("user", "I want to look at the tables")])
    await direct.listen([Message("user", "I want to look at the tables")])
    a, b = revised.context, direct.context
    assert a.ids == b.ids
    assert max_kv_diff(a, b) < 1e-5
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert a.prefilled - before < b.length - b.sink  # only the tail after "I want to" ran again
    await revised.aclose()
    await direct.aclose()


@pytest.mark.parametrize("arch", ARCHS)
async def test_cache_holds_exactly_the_heard_prefix_after_an_interruption(make_llm, arch):
    """Interrupt a streaming reply: the next listen (the record passes only the heard words) leaves
    exactly the heard prefix of the reply in the cache, equal token for token and in every key and
    value to a session that was only ever told the heard words."""
    llm = make_llm(arch, window=512, max_reply_tokens=40, temperature=0.0)
    stream = llm.new_stream(SHORT_SYSTEM)
    dialogue = [Message("user", "Tell me about the train to the city.")]
    await stream.listen(dialogue)
    pieces = []
    async with contextlib.aclosing(stream.reply(dialogue)) as reply:
        async for piece in reply:
            pieces.append(piece)
            if len(pieces) == 6:
                break  # the user barges in: the reply is closed here
    generated = stream.context.length
    spoken = "".join(pieces).split()
    assert len(spoken) >= 4
    heard = " ".join(spoken[:3])
    after = dialogue + [Message("assistant", heard), Message("user", "wait")]
    await stream.listen(after)
    fresh = llm.new_stream(SHORT_SYSTEM)
    await fresh.listen(after)
    a, b = stream.context, fresh.context
    assert a.ids == b.ids
    assert max_kv_diff(a, b) < 1e-5
    # The assistant message in the cache decodes to the heard words and nothing more.
    fmt = llm.format
    start = a.dialogue.starts[2]  # system, user, assistant
    end = a.dialogue.starts[3]
    text = llm.engine.tokenizer.decode(a.ids[start:end], skip_special_tokens=False)
    prefix, suffix = fmt.wrappers["assistant"]
    assert text == prefix + heard + suffix
    assert generated > a.dialogue.starts[3]  # more had been generated than was kept
    await stream.aclose()
    await fresh.aclose()


async def test_end_of_turn_probability_comes_from_logits_already_computed(make_llm):
    """listen() returns P(end-of-message token) from the prefill's own logits: asking again with the
    same words runs nothing, and the value is that token's softmax probability."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=16)
    stream = llm.new_stream(SHORT_SYSTEM)
    msgs = [Message("user", "Please set a timer for ten minutes")]
    p = await stream.listen(msgs)
    ctx = stream.context
    ran = ctx.prefilled
    assert p == pytest.approx(float(torch.softmax(ctx.logits, -1)[llm.format.end_of_message]), rel=1e-6)
    assert await stream.listen(msgs) == pytest.approx(p)
    assert ctx.prefilled == ran
    # The open message has no end-of-message token yet; the closed one ends with it.
    eom = llm.format.end_of_message
    assert ctx.ids[-1] != eom
    await stream.listen(msgs + [Message("assistant", "Sure.")])
    assert eom in ctx.ids[ctx.dialogue.starts[1]:ctx.dialogue.starts[2]]
    await stream.aclose()


async def test_eviction_keeps_the_sink_and_cuts_at_message_starts(make_llm):
    """Over a dialogue many times the window, every held token maps onto the dialogue (sink =
    system block, then a contiguous recent suffix), cuts land on message starts when one is near,
    and the cache ends exactly at the rendered dialogue."""
    llm = make_llm("llama", window=160, max_reply_tokens=16)
    stream = llm.new_stream(SHORT_SYSTEM)
    msgs: list[Message] = []
    offsets = []
    for i in range(40):
        msgs.append(Message("user" if i % 2 == 0 else "assistant", f"turn {i}: the train leaves at nine fifteen"))
        await stream.listen(msgs)
        ctx = stream.context
        assert ctx.length <= 160
        assert ctx.ids[:ctx.sink] == ctx.dialogue.ids(0, ctx.sink).tolist()
        assert ctx.ids[ctx.sink:] == ctx.dialogue.ids(ctx.offset, ctx.end).tolist()
        assert ctx.end == ctx.dialogue.length
        offsets.append(ctx.offset)
    assert ctx.evictions >= 5
    moved = sorted(set(offsets) - {ctx.sink})
    assert moved and all(o in ctx.dialogue.boundaries() for o in moved)
    await stream.aclose()


async def test_change_before_the_window_rebuilds_from_recent_messages(make_llm):
    """Editing a message that was already evicted cannot be compared with the cache: the context
    starts over from the system block and the most recent messages, and maps exactly again; so does
    a dialogue cut back to before the window."""
    llm = make_llm("qwen2", window=160, max_reply_tokens=16)
    stream = llm.new_stream(SHORT_SYSTEM)
    msgs = [Message("user" if i % 2 == 0 else "assistant", f"message {i} about the weather tomorrow")
            for i in range(30)]
    await stream.listen(msgs)
    ctx = stream.context
    assert ctx.offset > ctx.sink
    msgs[0] = Message("user", "an edited first message")
    await stream.listen(msgs)
    assert ctx.ids[ctx.sink:] == ctx.dialogue.ids(ctx.offset, ctx.end).tolist()
    assert ctx.end == ctx.dialogue.length and ctx.length <= 160
    # A dialogue cut back to before the window needs messages whose token ids were pruned: they
    # are tokenised again, and the cache equals that of a session that only saw the short dialogue.
    await stream.listen(msgs[:12])
    fresh = llm.new_stream(SHORT_SYSTEM)
    await fresh.listen(msgs[:12])
    assert ctx.ids == fresh.context.ids and ctx.offset == fresh.context.offset
    assert max_kv_diff(ctx, fresh.context) < 1e-5
    await stream.aclose()
    await fresh.aclose()


def _dialogue_script(conv):
    """A long dialogue as the session drives the record: partials of each user turn, its end, a reply
    heard in part or whole, now and then a reply dropped unheard (the user's turn reopens and merges).
    Yields (messages handed to the LLM, open_last, generation_prompt)."""
    from duplex.events import Word

    rid = 0
    for turn in range(40):
        words = f"turn {turn} could you tell me the weather near the river".split()
        for i in range(1, len(words) + 1, 3):
            yield conv.messages(" ".join(words[:i])), True, False
        conv.user_turn_ended(" ".join(words), 0, 1, 0.0)
        rid += 1
        reply = conv.reply_started(rid, turn, 24000, 0.0)
        yield conv.messages(), False, True
        if turn % 7 == 3:  # dropped before a word was heard: the next words join this user turn
            conv.reply_cancelled_unheard(rid)
            yield conv.messages("and tomorrow"), True, False
            conv.user_turn_ended(" ".join(words) + " and tomorrow", 0, 1, 0.0)
            rid += 1
            reply = conv.reply_started(rid, turn, 24000, 0.0)
        reply.text = f"reply {rid} it will be sunny all day long"
        reply.words = [Word(w, k * 1000, (k + 1) * 1000) for k, w in enumerate(reply.text.split())]
        reply.played = 4000 if turn % 3 == 0 else 10**9  # interrupted after four words, or heard whole
        conv.reply_closed(rid, interrupted=turn % 3 == 0)
        yield conv.messages(), False, False


def test_dialogue_tail_updates_equal_full_updates(make_llm):
    """The record's Dialogue lets the LLM compare only its tail while its settled part is the one
    seen before; over a long dialogue (partials, interruptions, a reply dropped unheard) every update
    gives the same first change, keys and token ids as comparing the whole dialogue each time."""
    from duplex.conversation import Conversation
    from duplex.llm.chat import DialogueTokens
    from duplex.stages import Dialogue

    fmt = make_llm("qwen2", window=192).format
    fast, full = DialogueTokens(fmt, SHORT_SYSTEM), DialogueTokens(fmt, SHORT_SYSTEM)
    steps = 0
    for messages, open_last, gen in _dialogue_script(Conversation()):
        assert isinstance(messages, Dialogue)
        got = fast.update(messages, open_last=open_last, generation_prompt=gen)
        want = full.update(list(messages), open_last=open_last, generation_prompt=gen)
        assert got == want
        assert fast.keys == full.keys and fast.starts == full.starts and fast.length == full.length
        fast.prune(fast.length // 2)
        full.prune(full.length // 2)
        assert (fast.ids(fast.length // 2) == full.ids(full.length // 2)).all()
        steps += 1
    assert steps > 200


def test_a_partial_does_not_walk_the_dialogue(make_llm):
    """Per ASR partial the work does not grow with the dialogue: the record hands out one settled
    tuple per version, and the LLM's dialogue never iterates it again once it has seen it."""
    from duplex.conversation import Conversation
    from duplex.events import Word
    from duplex.llm.chat import DialogueTokens
    from duplex.stages import Dialogue

    class Walked(tuple):  # a settled part that counts how often it is walked
        walks = 0

        def __iter__(self):
            Walked.walks += 1
            return super().__iter__()

    conv = Conversation()
    for i in range(300):
        conv.user_turn_ended(f"question {i}", 0, 1, 0.0)
        reply = conv.reply_started(i, i, 24000, 0.0)
        reply.words, reply.played = [Word("answer", 0, 1000), Word(str(i), 1000, 2000)], 2000
        conv.reply_closed(i, interrupted=False)
    first, second = conv.messages("what about"), conv.messages("what about now")
    assert first.settled is second.settled and len(first) == 601

    tokens = DialogueTokens(make_llm("qwen2", window=192).format, SHORT_SYSTEM)
    settled = Walked(first.settled)
    tokens.update(Dialogue(settled, first.tail), open_last=True)
    walks = Walked.walks
    assert walks >= 1
    for words in ("what about now", "what about now then", "what about the river"):
        first_change = tokens.update(Dialogue(settled, (first.tail[0], Message("user", words))), open_last=True)
        assert first_change > tokens.starts[-1]  # only the open user message changed
    assert Walked.walks == walks


async def test_a_new_session_copies_a_system_block_seen_before_exactly(make_llm):
    """The first session with a system prompt runs it; a later one (and a rebuilt cache) copies its
    K/V and logits from the engine instead of running it, and holds exactly what running it makes:
    the same ids, K/V, logits and estimate, bit for bit, and the same sampled reply. Another prompt
    is run; the engine keeps only the last SYSTEM_BLOCKS_KEPT blocks."""
    from duplex.llm import engine as engine_module

    llm = make_llm("qwen2", window=256, max_reply_tokens=12, temperature=0.7)
    words = [Message("user", "Book a table for four people at eight")]
    first = llm.new_stream(SHORT_SYSTEM)
    p_first = await first.listen(words)
    ran_first = first.context.prefilled
    second = llm.new_stream(SHORT_SYSTEM)
    p_second = await second.listen(words)
    a, b = first.context, second.context
    assert b.prefilled == ran_first - b.sink  # the system block was copied, not run
    assert a.ids == b.ids and max_kv_diff(a, b) == 0.0 and torch.equal(a.logits, b.logits)
    assert p_first == p_second
    said = []
    for s in (first, second):
        said.append("".join([piece async for piece in s.reply(words)]))
    assert said[0] == said[1] and said[0]
    other = llm.new_stream("You are a pirate. Answer in one short sentence.")
    await other.listen(words)
    assert other.context.prefilled > ran_first - b.sink  # another system prompt: run
    assert len(llm.engine._systems) == 2
    for s in (first, second, other):
        await s.aclose()
    many = [llm.new_stream(f"You are assistant number {i}.") for i in range(engine_module.SYSTEM_BLOCKS_KEPT + 2)]
    for s in many:
        await s.listen(words)
        await s.aclose()
    assert len(llm.engine._systems) == engine_module.SYSTEM_BLOCKS_KEPT
