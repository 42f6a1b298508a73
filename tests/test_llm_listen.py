"""Listening on a clock: every session's new words in one prefill pass, never one prefill per partial.

The LLM takes the user's words of all sessions that have new ones together, at most once per listen
period (one ASR chunk), as one pass over the engine's rows (:meth:`Engine.prefill_rows`); reply
starts join the same pass (and make it due at once). Each session's cache, logits, end-of-turn
estimate and reply must be those it gets alone, whichever other sessions share the pass (and
whether they are replying meanwhile)."""

from __future__ import annotations

import asyncio
import time

import pytest

from duplex.stages import Message
from llm_fixtures import SHORT_SYSTEM, make_llm, max_kv_diff, tiny_checkpoints, single_torch_thread  # noqa: F401

DIALOGUES = [
    [Message("user", "Hello there.")],
    [Message("user", "Book a table."), Message("assistant", "For how many?"), Message("user", "Four people, at")],
    [Message("user", "What is the weather like in Paris tomorrow morning, and should I take an umbrella")],
]


async def test_sessions_listening_together_get_what_each_gets_alone(make_llm):
    """Three sessions' listens, submitted at once, run as one pass; a fourth session scores its user's
    words on top of its active reply in the same pass. Each cache (ids, K/V, logits) and estimate
    equals that of a session of the same dialogue listening alone, and the reply is left as it was."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=16, temperature=0.0)
    together = [llm.new_stream(SHORT_SYSTEM) for _ in DIALOGUES]
    speaker = llm.new_stream(SHORT_SYSTEM)
    reply = speaker.reply([Message("user", "Tell me a story.")])
    await reply.__anext__()  # the reply holds the speaker's cache now ...
    await asyncio.sleep(0.3)  # ... and has decoded as far ahead as it may: it waits for its reader
    held = list(speaker.context.ids)
    over = [Message("user", "Tell me a story."), Message("assistant", "Once"), Message("user", "wait, stop")]
    batches = llm.prefills.batches
    got = await asyncio.gather(*(s.listen(d) for s, d in zip(together, DIALOGUES)), speaker.listen(over))
    assert llm.prefills.batches == batches + 1  # one pass for all four
    scored_alone = await speaker.listen(over)  # alone now: the same score, the reply untouched
    assert speaker.context.ids == held
    assert got[-1] == pytest.approx(scored_alone, abs=1e-6)
    for stream, dialogue, p in zip(together, DIALOGUES, got):
        alone = llm.new_stream(SHORT_SYSTEM)
        p_alone = await alone.listen(dialogue)
        a, b = stream.context, alone.context
        assert a.ids == b.ids and max_kv_diff(a, b) < 1e-5
        assert float((a.logits - b.logits).abs().max()) < 1e-5
        assert p == pytest.approx(p_alone, abs=1e-6)
        await alone.aclose()
    await reply.aclose()
    for s in (*together, speaker):
        await s.aclose()


async def test_no_prefill_per_partial_only_one_pass_per_listen_period(make_llm):
    """Four sessions whose words change every 20 ms (four times faster than ASR partials come) for
    a second, each with one listen in flight as a session keeps it: the LLM runs at most one pass
    per listen period (80 ms), each session is prefilled at most that often, and the passes hold
    several sessions at once."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=16)
    period = llm.prefills.period
    streams = [llm.new_stream(SHORT_SYSTEM) for _ in range(4)]
    words = "so I was thinking that we could maybe go to the lake this weekend if the weather holds".split()
    said = [1] * len(streams)
    done = asyncio.Event()

    async def speak(i: int) -> None:
        while not done.is_set():
            await asyncio.sleep(0.02)
            said[i] += 1

    async def listen(i: int) -> int:
        count = 0
        while not done.is_set():
            text = " ".join((words * 4)[: said[i]])
            await streams[i].listen([Message("user", text)])
            count += 1
        return count

    batches0, handled0 = llm.prefills.batches, llm.prefills.handled
    start = time.monotonic()
    speakers = [asyncio.create_task(speak(i)) for i in range(len(streams))]
    listeners = [asyncio.create_task(listen(i)) for i in range(len(streams))]
    await asyncio.sleep(1.0)
    done.set()
    counts = await asyncio.gather(*listeners)
    await asyncio.gather(*speakers)
    elapsed = time.monotonic() - start
    batches, handled = llm.prefills.batches - batches0, llm.prefills.handled - handled0
    ticks = elapsed / period + 1  # the most passes the clock allows
    print(f"{handled} listens of {len(streams)} sessions in {batches} passes over {elapsed:.2f} s "
          f"(at most {ticks:.1f}); partials {sum(said)}")
    assert batches <= ticks
    assert all(c <= ticks for c in counts)
    assert sum(said) > 3 * handled  # many partials, few prefills
    assert handled / batches >= 2.5  # passes are shared
    for s in streams:
        await s.aclose()


async def test_reply_starts_of_many_sessions_share_the_pass_and_reply_as_alone(make_llm):
    """Four listening sessions start replies in the same tick: two whose words a listen already ran,
    two whose last words are new (each gets a listen of them first, so its estimate is a listen's,
    and starts a round later). The six asks are one batch of two passes, no prefill of a session
    alone, and each round's first tokens are sampled in one verdict step; each reply (sampled, temperature
    0.7) and estimate equals the one the same session gets alone."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=12, temperature=0.7)
    dialogues = [*DIALOGUES, [Message("user", "Tell me a story about a lighthouse.")]]

    async def say(stream, dialogue) -> str:
        return "".join([piece async for piece in stream.reply(dialogue)])

    heard = [d if i < 2 else [*d[:-1], Message("user", " ".join(d[-1].content.split()[:2]))]
             for i, d in enumerate(dialogues)]  # what each session's listens ran before the reply
    together = [llm.new_stream(SHORT_SYSTEM) for _ in dialogues]
    for stream, words in zip(together, heard):
        await stream.listen(words)
    passes = {"rows": 0, "alone": 0, "draws": 0}
    engine = llm.engine
    real = {"rows": engine.prefill_rows, "alone": engine.prefill, "draws": engine.verdicts}

    def counted(kind):
        def call(*args, **kwargs):
            passes[kind] += 1
            return real[kind](*args, **kwargs)
        return call

    for kind, name in (("rows", "prefill_rows"), ("alone", "prefill"), ("draws", "verdicts")):
        setattr(engine, name, counted(kind))
    batches = llm.prefills.batches
    texts = await asyncio.gather(*(say(s, d) for s, d in zip(together, dialogues)))
    assert llm.prefills.batches == batches + 1
    assert passes == {"rows": 2, "alone": 0, "draws": 2}, passes  # two rounds, each its one draw
    for kind, name in (("rows", "prefill_rows"), ("alone", "prefill"), ("draws", "verdicts")):
        delattr(engine, name)
    assert any(texts)
    for i, (stream, dialogue, words, text) in enumerate(zip(together, dialogues, heard, texts)):
        alone = llm.new_stream(SHORT_SYSTEM)
        await alone.listen(words)
        assert await say(alone, dialogue) == text, i
        assert stream._estimate[1] == pytest.approx(alone._estimate[1], abs=1e-6)
        await alone.aclose()
    for stream in together:
        await stream.aclose()


async def test_a_prefill_pass_copies_to_the_host_once_whatever_it_holds(make_llm):
    """One tick's pass of three listens and two reply starts waits for the device once: every
    estimate and every first token come back in one copy, from one verdict step (each was a sync
    of its own, and then the estimates and the draws were one each)."""
    from tests.graph_safety import HostSyncs

    llm = make_llm("qwen2", window=256, max_reply_tokens=4, temperature=0.0)
    streams = [llm.new_stream(SHORT_SYSTEM) for _ in range(5)]
    words = [[Message("user", f"Session {i} says something short")] for i in range(5)]
    for stream, said in zip(streams, words):
        await stream.listen([Message("user", said[0].content.split()[0])])
    for stream, said in zip(streams[3:], words[3:]):
        await stream.listen(said)  # the starting sessions heard all their words: one round
    passes: list[tuple[int, list[str]]] = []
    real = llm._prefill_round

    def counted(asks):
        with HostSyncs() as syncs:
            out = real(asks)
        passes.append((len(asks), list(syncs.counts)))
        return out

    llm._prefill_round = counted

    async def say(stream, said) -> str:
        return "".join([piece async for piece in stream.reply(said)])

    await asyncio.gather(*(s.listen(w) for s, w in zip(streams[:3], words[:3])),
                         *(say(s, w) for s, w in zip(streams[3:], words[3:])))
    assert len(passes) == 1 and passes[0][0] == 5, passes
    assert len(passes[0][1]) == 1, passes
    for stream in streams:
        await stream.aclose()


async def test_a_session_alone_takes_the_captured_pass_where_it_is_a_replay(make_llm, monkeypatch):
    """Where the prefill pass is a graph replay (a GPU with graphs; here its buckets are said to
    replay, so the pass runs the captured step's code eagerly), a session listening, starting a
    reply or checking a barge-in for a backchannel alone takes that pass, not an eager prefill of its
    own row; its cache, estimate, sampled reply and verdicts are those of the eager prefill (what
    the CPU, and every test above, runs)."""
    from duplex.engine.graphs import BucketedStep
    from duplex.llm import engine as engine_module

    dialogue = DIALOGUES[2]
    first = [Message("user", " ".join(dialogue[0].content.split()[:3]))]

    async def alone(llm) -> tuple:
        stream = llm.new_stream(SHORT_SYSTEM)
        await stream.listen(first)  # builds the context (system prompt and words), alone
        estimate = await stream.listen(dialogue)
        context = stream.context
        ids, logits = list(context.ids), context.logits.clone()
        text = "".join([piece async for piece in stream.reply(dialogue)])
        said = [*dialogue, Message("assistant", text)]
        verdicts = [await stream.is_backchannel(said, words) for words in ("uh huh", "wait, stop talking")]
        await stream.aclose()
        return estimate, ids, logits, text, verdicts

    eager = await alone(make_llm("qwen2", window=256, max_reply_tokens=12, temperature=0.7))
    monkeypatch.setattr(BucketedStep, "replays", property(lambda self: True))
    llm = make_llm("qwen2", window=256, max_reply_tokens=12, temperature=0.7)
    calls: dict[str, list[int]] = {"rows": [], "alone": []}
    engine = llm.engine
    real = {"rows": engine.prefill_rows, "alone": engine.prefill}

    def counted(kind):
        def call(*args):
            if kind == "alone" or args[0]:  # (a round with nothing to run passes no request)
                calls[kind].append(max(len(ids) for _, ids in args[0]) if kind == "rows" else len(args[1]))
            return real[kind](*args)
        return call

    engine.prefill_rows, engine.prefill = counted("rows"), counted("alone")
    replayed = await alone(llm)
    # the context (system prompt and first words), the listen, the reply's start, the two backchannel
    # checks (the tiny tokenizer makes the question about 90 tokens, Qwen's about 55): the ones longer
    # than the longest bucket in pieces of it
    longest = engine_module.PREFILL_LENGTHS[-1]
    assert not calls["alone"] and len(calls["rows"]) >= 5 and max(calls["rows"]) == longest, calls
    assert replayed[0] == pytest.approx(eager[0], abs=1e-6)
    assert replayed[1] == eager[1]
    assert float((replayed[2] - eager[2]).abs().max()) < 1e-5
    assert replayed[3] == eager[3] and replayed[4] == eager[4]


def test_prefills_longer_than_the_longest_bucket_replay_in_pieces_beside_short_ones(make_llm, monkeypatch):
    """Where the prefill pass is a graph replay (said so here, as above), a tick's prefills stay
    replays when one is longer than the longest token bucket (a long catch-up beside short listens):
    each is cut into pieces of at most that bucket and pass ``k`` runs every request's ``k``-th piece,
    so no pass is longer than a bucket. Each session's K/V and logits equal those of the prefills
    without graphs (one eager pass at the longest entry's length). Fails when a long request makes
    the whole pass run at its own length."""
    import torch

    from duplex.engine.graphs import BucketedStep
    from duplex.llm.engine import PREFILL_LENGTHS

    engine = make_llm("qwen2", window=512).engine
    g = torch.Generator().manual_seed(0)
    vocab = engine.embed.shape[0]
    prefix = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (20, 5, 9)]
    tail = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (150, 10, 70)]

    def run() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        slots = [engine.new_slot() for _ in prefix]
        for slot, ids in zip(slots, prefix):
            engine.prefills([(slot, ids)])
        logits = engine.prefills(list(zip(slots, tail)))
        kv = [[t[slot.row, :, :slot.length].clone() for t in (*engine.kv.keys, *engine.kv.values)] for slot in slots]
        for slot in slots:
            engine.release(slot)
        return logits, kv

    eager = run()
    passes = []
    rows = engine.prefill_rows
    monkeypatch.setattr(engine, "prefill_rows",
                        lambda requests: passes.append([len(ids) for _, ids in requests]) or rows(requests))
    monkeypatch.setattr(BucketedStep, "replays", property(lambda self: True))
    replayed = run()
    longest = PREFILL_LENGTHS[-1]
    assert passes[3:] == [[longest, 10, longest], [longest, 6], [22]], passes  # after the three prefixes
    for a, b in zip(eager[0], replayed[0]):
        assert float((a - b).abs().max()) < 1e-5
    for a, b in zip(eager[1], replayed[1]):
        assert max(float((x - y).abs().max()) for x, y in zip(a, b)) < 1e-5
