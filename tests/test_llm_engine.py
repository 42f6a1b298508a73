"""The LLM engine's batched decode: each session gets exactly what it gets alone, static shapes, and
one session's failure ends only that session."""

from __future__ import annotations

import asyncio

import pytest
import torch

from duplex.llm.engine import DecodeRequest, Draw
from duplex.stages import Message
from llm_fixtures import ARCHS, SHORT_SYSTEM, make_llm, tiny_checkpoints, single_torch_thread  # noqa: F401

# (prompt length, the step it joins at, decode steps); sessions of different lengths that join and
# leave at different times
PLAN = [(7, 0, 12), (23, 0, 5), (15, 3, 9), (40, 4, 6), (3, 8, 7)]
DRAWS = [Draw(0.0, 1.0, 0, 0), Draw(0.9, 0.8, 11, 0), Draw(1.3, 1.0, 5, 0), Draw(0.7, 0.95, 11, 0),
         Draw(0.0, 1.0, 3, 0)]


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n, _, _ in PLAN]


def _run(engine, prompts, *, together: bool):
    """Decode every session of PLAN; returns per session (tokens, logits per step)."""
    engine.keep_logits = True
    slots = [engine.new_slot() for _ in PLAN]
    state = []
    for slot, prompt, draw in zip(slots, prompts, DRAWS):
        logits = engine.prefill(slot, prompt)
        first, = engine.sample(logits[None], [draw])
        state.append({"slot": slot, "last": first, "tokens": [first], "logits": [], "draw": draw, "n": 0})
    schedule = [[i for i, (_, join, steps) in enumerate(PLAN) if join <= t < join + steps] for t in range(20)]
    groups = [[i for i in rows] for rows in schedule] if together else \
        [[i] for rows in schedule for i in rows]
    for group in groups:
        if not group:
            continue
        requests = []
        for i in group:
            s = state[i]
            d = s["draw"]
            requests.append(DecodeRequest(s["slot"], s["last"], Draw(d.temperature, d.top_p, d.seed, s["n"] + 1)))
        tokens = engine.decode(requests)
        for i, token in zip(group, tokens):
            s = state[i]
            s["logits"].append(engine.last_logits(s["slot"]))
            s["slot"].length += 1
            s["last"], s["n"] = token, s["n"] + 1
            s["tokens"].append(token)
    for slot in slots:
        engine.release(slot)
    return [(s["tokens"], s["logits"], s["slot"]) for s in state]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_decode_equals_each_session_alone_and_the_model(make_llm, tiny_checkpoints, arch):
    """Sessions with different cache lengths, joining and leaving the batch at different steps, with
    greedy and sampled draws: every session's logits (<= 1e-5) and tokens equal those of the same
    session stepped alone, and the logits equal transformers' own forward over the whole sequence."""
    llm = make_llm(arch, window=128, max_reply_tokens=8)
    engine = llm.engine
    prompts = _prompts(engine.vocab)
    alone = _run(engine, prompts, together=False)
    together = _run(engine, prompts, together=True)
    model = tiny_checkpoints[arch][0]
    for (tokens_a, logits_a, _), (tokens_b, logits_b, _), prompt in zip(alone, together, prompts):
        assert tokens_a == tokens_b
        assert max(float((a - b).abs().max()) for a, b in zip(logits_a, logits_b)) <= 1e-5
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([prompt + tokens_a[:-1]])).logits[0].float()
        for step, logits in enumerate(logits_a):
            expected = ref[len(prompt) + step, : engine.vocab]
            assert float((logits[: engine.vocab] - expected).abs().max()) <= 1e-5
    sampled = [t for (t, _, _), d in zip(alone, DRAWS) if d.temperature > 0]
    assert sampled[0] != sampled[1]  # different settings and seeds draw differently


def test_sessions_moved_to_pack_decode_steps_keep_their_dialogues(make_llm):
    """Six sessions on rows 0-5 decode in changing subsets (a high row alone, two high rows, a row
    given back and a free row moved into, a new session on the lowest free row): each step's slots
    are moved onto rows 0..n-1, and every session's tokens and logits (<= 1e-5) are those of its
    steps in an engine of its own, whichever rows it was moved through."""
    shared = make_llm("qwen2", window=64, slots=6).engine
    shared.keep_logits = True
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, shared.vocab, (n,), generator=g).tolist() for n in (4, 7, 5, 9, 3, 6, 8)]
    draws = [Draw(0.0 if i % 2 else 0.9, 0.9, 20 + i, 0) for i in range(7)]
    plan = [[5], [4, 5], [1, 5], "release 2", [3, 4, 5], "new 6", [6, 0, 5], [2, 4]]  # session numbers
    own: dict[int, object] = {}
    slots: dict[int, object] = {}
    found: dict[int, list] = {i: [] for i in range(7)}

    def start(i: int) -> None:
        slots[i] = shared.new_slot()
        shared.prefill(slots[i], prompts[i])
        own[i] = make_llm("qwen2", window=64, slots=1).engine
        own[i].keep_logits = True
        alone = own[i].new_slot()
        own[i].prefill(alone, prompts[i])
        own[i].alone = alone

    for i in range(6):
        start(i)
    last = {i: prompts[i][-1] for i in range(7)}
    for step in plan:
        if step == "release 2":
            shared.release(slots.pop(2))
            continue
        if step == "new 6":
            free = sorted(set(range(6)) - {slot.row for slot in slots.values()})
            start(6)
            assert slots[6].row == free[0] == 4  # the row session 4 left when it moved into the freed row 2
            continue
        step = [i if i != 2 else 6 for i in step] if 2 not in slots else step
        requests = [DecodeRequest(slots[i], last[i], draws[i]) for i in step]
        tokens = shared.decode(requests)
        assert sorted(slots[i].row for i in step) == list(range(len(step)))
        for i, token in zip(step, tokens):
            mine = own[i].decode([DecodeRequest(own[i].alone, last[i], draws[i])])[0]
            found[i].append((token, mine, float((shared.last_logits(slots[i])
                                                 - own[i].last_logits(own[i].alone)).abs().max())))
            slots[i].length += 1
            own[i].alone.length += 1
            last[i] = token
    assert shared.moves >= 4
    for i, steps in found.items():
        assert all(token == mine and gap <= 1e-5 for token, mine, gap in steps), (i, steps)
    assert sum(len(steps) for steps in found.values()) == 13


def test_a_decode_step_is_as_wide_as_its_replies_not_as_the_highest_row(make_llm):
    """Four sessions hold rows 0-3 and only the one on row 3 replies: the decode step runs one entry,
    not four, on row 0, where that session's K/V moved (swapped with the session there, so the step
    reads its rows as a view, not a copy); every session's K/V is what it was, on whichever row, and
    the replying session gets the same token and logits (<= 1e-5) as in a step in which all four
    reply, where nothing moves."""
    engine = make_llm("qwen2", window=64, slots=4).engine
    engine.keep_logits = True
    slots = [engine.new_slot() for _ in range(4)]
    assert [s.row for s in slots] == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(1)
    for slot, n in zip(slots, (5, 9, 3, 7)):
        engine.prefill(slot, torch.randint(0, engine.vocab, (n,), generator=g).tolist())
    requests = [DecodeRequest(slot, 11 + i, Draw(0.8, 0.9, i, 1)) for i, slot in enumerate(slots)]

    def held(slot):  # every layer's keys and values of the positions the slot holds
        return [t[slot.row, :, :, :slot.length].clone() for t in engine.kv.layers]

    before = [held(slot) for slot in slots]
    engine.shape_log = []
    alone = engine.decode(requests[3:])
    alone_logits = engine.last_logits(slots[3])
    shapes, engine.shape_log = engine.shape_log, None
    assert [x for x, _, _ in shapes] == [(1, engine.decoder.hidden)]
    assert [s.row for s in slots] == [3, 1, 2, 0] and engine.moves == 1
    for slot, kept in zip(slots, before):
        assert all(torch.equal(now, then) for now, then in zip(held(slot), kept))
    together = engine.decode(requests)  # slot lengths were not advanced: the same positions again
    assert engine.moves == 1
    assert together[3] == alone[0]
    assert float((engine.last_logits(slots[3]) - alone_logits).abs().max()) <= 1e-5
    with pytest.raises(RuntimeError, match="twice"):
        engine.decode([requests[0], requests[0]])
    for slot in slots:
        engine.release(slot)


def test_a_decode_step_reads_the_length_bucket_of_its_longest_row(make_llm):
    """With a window of 600 positions the decode step has length buckets 256, 512 and every column:
    a session holding 20 positions steps over 256 alone, over 512 beside one holding 300, and over
    the whole window when the buckets are taken away; its token is the same and its logits equal
    (<= 1e-5) in all three, and so are the long session's alone and together."""
    engine = make_llm("qwen2", window=600, slots=2).engine
    engine.keep_logits = True
    assert engine.graphs.lengths == (256, 512, engine.kv.columns)
    short, long = engine.new_slot(), engine.new_slot()
    g = torch.Generator().manual_seed(3)
    for slot, n in ((short, 20), (long, 300)):
        engine.prefill(slot, torch.randint(0, engine.vocab, (n,), generator=g).tolist())
    requests = [DecodeRequest(short, 7, Draw(0.8, 0.9, 1, 1)), DecodeRequest(long, 9, Draw(0.0, 1.0, 2, 1))]

    def step(chosen):  # slot lengths are not advanced: each step runs the same positions again
        tokens = engine.decode(chosen)
        return engine.graphs.last, tokens, [engine.last_logits(r.slot) for r in chosen]

    short_alone, long_alone, together = step(requests[:1]), step(requests[1:]), step(requests)
    lengths = engine.graphs.lengths
    engine.graphs.lengths = (engine.kv.columns,)
    try:
        whole = step(requests)
    finally:
        engine.graphs.lengths = lengths
    assert [short_alone[0], long_alone[0], together[0], whole[0]] == [(1, 256), (1, 512), (2, 512),
                                                                       (2, engine.kv.columns)]
    for (_, tokens, logits), rows in ((short_alone, [0]), (long_alone, [1]), (whole, [0, 1])):
        assert tokens == [together[1][i] for i in rows]
        assert max(float((a - together[2][i]).abs().max()) for a, i in zip(logits, rows)) <= 1e-5
    for slot in (short, long):
        engine.release(slot)


def test_a_reply_that_crosses_a_length_bucket_says_what_the_whole_window_says(make_llm):
    """A sampled reply through the scheduler (steps run ahead) whose cache grows past 256 positions
    while it decodes, its steps moving from the 256 bucket to the 512 one: token for token the
    reply the same session makes when every step reads the whole window."""
    llm = make_llm("qwen2", window=600, max_reply_tokens=60, temperature=0.8, fixed_length=True, slots=2)
    engine = llm.engine
    words = "the train leaves the station at noon and the weather is fine " * 12
    dialogue = [Message("user", words), Message("assistant", "yes"), Message("user", "tell me about the train")]

    async def reply() -> tuple[str, set[int]]:
        stream = llm.new_stream(SHORT_SYSTEM)
        seen: set[int] = set()
        launch = engine.launch

        def watched(requests):  # the length bucket of every step launched
            launched = launch(requests)
            seen.add(engine.graphs.last[1])
            return launched

        engine.launch = watched
        try:
            await stream.listen(dialogue)
            start = stream.context.length
            text = "".join([piece async for piece in stream.reply(dialogue)])
        finally:
            del engine.launch
            await stream.aclose()
        assert start < 256 < start + 60, start  # the reply's steps cross the bucket's end
        return text, seen

    bucketed, lengths = asyncio.run(reply())
    assert lengths == {256, 512}, lengths
    saved = engine.graphs.lengths
    engine.graphs.lengths = (engine.kv.columns,)
    try:
        whole, lengths = asyncio.run(reply())
    finally:
        engine.graphs.lengths = saved
    assert lengths == {engine.kv.columns}
    assert bucketed == whole and bucketed


def test_every_decode_step_of_a_session_sees_the_same_shapes(make_llm):
    """A reply decoded across many evictions and a rollback runs its decode steps on identical tensor
    shapes (a window under 256 positions has one length bucket, the whole window, whatever the
    cache holds), which is what lets a GPU replay one graph."""
    llm = make_llm("qwen2", window=96, max_reply_tokens=40, temperature=0.0, fixed_length=True, slots=1)

    async def main():
        stream = llm.new_stream(SHORT_SYSTEM)
        llm.engine.shape_log = []
        dialogue = [Message("user", "tell me about the train")]
        for _ in range(5):
            text = "".join([piece async for piece in stream.reply(dialogue)])
            dialogue += [Message("assistant", text[: len(text) // 2]), Message("user", "go on")]
            await stream.listen(dialogue)
        evictions = stream.context.evictions
        await stream.aclose()
        return evictions

    evictions = asyncio.run(main())
    shapes = llm.engine.shape_log
    llm.engine.shape_log = None
    assert evictions >= 3 and len(shapes) >= 5 * 39
    assert set(shapes) == {((1, 64), (1,), (1, 2, 104, 16))}, set(shapes)  # 96 + scratch, padded to 8


async def test_concurrent_replies_equal_replies_alone(make_llm):
    """Three sessions replying at once through the scheduler (batched decode steps) say exactly what
    each says alone, sampled replies included."""
    llm = make_llm("llama", window=192, max_reply_tokens=24, temperature=0.8)
    dialogues = [[Message("user", "tell me about the train")], [Message("user", "what is the weather")],
                 [Message("user", "hello"), Message("assistant", "hi there"), Message("user", "book a table")]]

    async def speak(stream, dialogue):
        return "".join([piece async for piece in stream.reply(dialogue)])

    alone = []
    for dialogue in dialogues:
        stream = llm.new_stream(SHORT_SYSTEM)
        alone.append(await speak(stream, dialogue))
        await stream.aclose()
    streams = [llm.new_stream(SHORT_SYSTEM) for _ in dialogues]
    before = llm.scheduler.ticks
    together = await asyncio.gather(*(speak(s, d) for s, d in zip(streams, dialogues)))
    assert list(together) == alone and len(set(alone)) == 3
    assert max(llm.scheduler.batch_sizes(before)) == 3  # they really shared steps
    for s in streams:
        await s.aclose()


async def test_a_failing_session_ends_alone(make_llm):
    """A session whose decode fails inside a batched step (here: a corrupt token id) gets the error;
    the other session in the same steps goes on and says exactly what it says alone."""
    llm = make_llm("qwen2", window=192, max_reply_tokens=24, temperature=0.0, fixed_length=True)
    dialogue = [Message("user", "tell me about the train")]
    ref = llm.new_stream(SHORT_SYSTEM)
    expected = "".join([p async for p in ref.reply(dialogue)])
    await ref.aclose()
    good, bad = llm.new_stream(SHORT_SYSTEM), llm.new_stream(SHORT_SYSTEM)

    async def speak(stream, corrupt: bool):
        out = []
        async for piece in stream.reply(dialogue):
            out.append(piece)
            if corrupt and len(out) == 2:  # from now on its steps run a token that does not exist
                asked = stream.decode_request  # (every step: one may already be running ahead)

                def bad(reply, asked=asked):
                    request = asked(reply)
                    return None if request is None else DecodeRequest(request.slot, 10**9, request.draw)

                stream.decode_request = bad  # the embedding lookup fails
        return "".join(out)

    results = await asyncio.gather(speak(good, False), speak(bad, True), return_exceptions=True)
    assert results[0] == expected
    assert isinstance(results[1], IndexError)
    assert await good.listen(dialogue + [Message("assistant", expected), Message("user", "thanks")]) is not None
    for s in (good, bad):
        await s.aclose()
    assert llm.engine.free_slots == llm.engine.slots


def test_all_slots_in_use_is_a_clear_error(make_llm):
    """More sessions than engine slots: the next one is refused with a message naming the setting."""
    llm = make_llm("qwen2", window=128, max_reply_tokens=8, slots=2)
    a, b = llm.new_context(SHORT_SYSTEM), llm.new_context(SHORT_SYSTEM)
    with pytest.raises(RuntimeError, match="engine-slots"):
        llm.new_context(SHORT_SYSTEM)
    a.close()
    llm.new_context(SHORT_SYSTEM).close()  # a released slot serves the next session
    b.close()


def test_bench_llm_reports_every_batch_size(tmp_path, capsys, monkeypatch):
    """`duplex bench llm --profile tiny --batch 1 2` measures each batch size through the engine and
    writes step time, per-session and aggregate tokens/s and first-token latency (values not asserted),
    and the step of one reply among sessions holding every row, and the largest batch's step in
    young dialogues with the length bucket each reads.
    With graphs captured, it measures every batch size again eagerly and compares the replies. The CPU
    captures nothing, so here the step claims to be captured and both runs are eager: the comparison
    runs and finds a batch's replies the same from one run to the next."""
    import json

    from duplex.cli import main
    from duplex.engine.graphs import BucketedStep

    monkeypatch.setattr(BucketedStep, "captured", property(lambda self: True))

    assert main(["bench", "llm", "--profile", "tiny", "--device", "cpu", "--batch", "1", "2",
                 "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "llm.json").read_text())["figures"]["tiny"]
    assert [r["batch"] for r in figures["batches"]] == [1, 2]
    assert all({"step_ms", "per_session_per_s", "aggregate_per_s", "first_token_ms"} <= set(r)
               for r in figures["batches"])
    assert figures["decode_sink_evictions"] >= 3
    assert all(r["captured_equals_eager"] and "step_ms_eager" in r for r in figures["batches"])
    scattered = figures["scattered"]  # one reply on the highest of the 3 rows (largest batch + 1)
    assert scattered["replies"] == 1 and scattered["rows_held"] == 3 and scattered["step_ms"] > 0
    # each row says which length bucket its steps read; the largest batch again in young dialogues
    young = figures["young"]
    assert young["batch"] == 2 and young["step_ms"] > 0 and young["attention_length"] in (192, 200)
    assert all(r["attention_length"] == young["attention_length"] for r in figures["batches"])  # one length
    out = capsys.readouterr().out
    assert "batch   2" in out and "replies equal" in out


def test_engine_options_reach_the_config():
    """--engine-slots and --no-graphs set the engines' rows and graph capture; a bad slot count is a
    clear error naming the setting."""
    from duplex.cli import build_parser, config_from_args
    from duplex.errors import ConfigError

    args = build_parser().parse_args(["serve", "--profile", "fake", "--no-graphs", "--engine-slots", "3"])
    config = config_from_args(args)
    assert config.graphs is False and config.slots() == 3
    assert config_from_args(build_parser().parse_args(["serve", "--profile", "fake", "--device", "cpu"])).slots() == 4
    args = build_parser().parse_args(["serve", "--profile", "fake", "--engine-slots", "0"])
    with pytest.raises(ConfigError, match="engine_slots"):
        config_from_args(args)
