"""``duplex bench llm``: decode throughput per batch size, time to first token, the sink cache's cost.

For each architecture (random profile: Qwen2.5-0.5B and 1.5B configurations with random weights;
``--quick`` or the tiny profile: one model, short lengths), on fixed token counts (replies never stop
early), through the same engine, scheduler and streams a live session uses:

- **batches** (``--batch 1 8 32``): that many sessions reply at once; each tick of the engine runs one
  decode step for all of them. Per batch size: ``step_ms`` (wall time of one step), tokens per
  second for one session and in aggregate, and ``first_token_ms``: how long a new reply waits for
  its first token while the others decode (its prefill runs between their steps). On a GPU with
  graphs captured, every batch size is measured both ways: captured and eager (``*_eager`` keys),
  and ``captured_equals_eager`` says whether the graph replays said exactly what the eager steps
  said (greedy replies).
- **TTFT after a user turn**, from the end of the turn to the first reply token: *incremental* (the
  user's words were prefilled word by word while they spoke), *turn-end* (the whole user message is
  prefilled at the end of the turn) and *cold* (a new session: the whole dialogue after its
  system block is prefilled; the system block, seen before, is copied from the engine);
- **the sink cache's decode cost**: one session decoding with the cache kept full, evicting a chunk
  every quarter window (many times over the run), against the same session decoding with room to
  spare (no eviction); the step shapes are static, so the difference is the eviction work;
- **speedup over sliding-window recomputation**: re-running the model over the last ``window``
  tokens for every new token (what a model without a sink cache must do to stay within a window);
- **cache memory**: bytes per session (constant);
- **replies among listeners** (``scattered``): a quarter of the largest batch replying on the highest
  rows while every row is held by a listening session: the step as wide as the replies against a
  step over every row up to the highest (what a step sized by the highest row ran).

On CPU compare the ratios; absolute times mean something on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from typing import TYPE_CHECKING, Any

from duplex.engine import fusion
from duplex.engine.roofline import floor_fraction
from duplex.stages import Message, frozen

if TYPE_CHECKING:
    from duplex.config import Profile

QUICK: dict[str, Any] = dict(archs=("qwen2.5-0.5b",), window=192, decode=64, long_decode=160, recompute_steps=2,
                             repeats=2, partial_every=4, batches=(1, 8))
FULL: dict[str, Any] = dict(archs=("qwen2.5-0.5b", "qwen2.5-1.5b"), window=2048, decode=64, long_decode=2400,
                            recompute_steps=4, repeats=3, partial_every=1, batches=(1, 8, 32))
SYSTEM = "You are a friendly voice assistant. Answer briefly, in plain spoken English."
LINES = ["Could you tell me the weather for tomorrow in the city?",
         "It will be sunny in the morning and rainy in the evening, so take an umbrella.",
         "I would like to book a table for two people on Friday evening near the river.",
         "Sure, I can help with that. Let me think about it for a moment."]
USER_TURN = ("and so my fellow americans ask not what your country can do for you ask what you can do "
             "for your country and then tell me the time")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    quick = args.quick or args.profile == "tiny"
    plan: dict[str, Any] = dict(QUICK if quick else FULL)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.quick and getattr(args, "llm_window", None) and args.llm_window != 2048:
        plan["window"] = args.llm_window
    if getattr(args, "batch", None):
        plan["batches"] = tuple(args.batch)
    archs = (args.llm_model,) if getattr(args, "llm_model", None) else plan["archs"]
    if args.profile in ("tiny", "pretrained") and not getattr(args, "llm_model", None):
        archs = (args.profile,)
    graphs = getattr(args, "graphs", True)
    compile_ = getattr(args, "compile", False)
    if device == "cpu" and args.profile == "tiny":
        torch.set_num_threads(1)  # tiny ops: a second intra-op thread only adds sync cost
    print(f"window {plan['window']} tokens, decode {plan['decode']} tokens per reply, batches "
          f"{list(plan['batches'])}, device {device}, profile {args.profile}, graphs {graphs}, compile {compile_ and device.startswith('cuda')}")
    results: dict[str, Any] = {}
    for arch in archs:
        llm = _load(args.profile, arch, device, plan, graphs, compile_)
        try:
            results[arch] = figures = asyncio.run(_bench_one(llm, plan, device))
        finally:
            llm.close()
            del llm
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        _print(arch, figures)
    return results


def _load(profile: Profile, arch: str, device: str, plan: dict[str, Any], graphs: bool, compile_: bool):
    from duplex.config import AgentConfig
    from duplex.llm.model import LLMSettings, SinkLLM
    from duplex.llm.profiles import load_model

    config = AgentConfig(profile=profile, device=device,
                         llm_model=None if arch in ("tiny", "pretrained") else arch)
    model, tokenizer = load_model(config, device)
    settings = LLMSettings(window=plan["window"], max_reply_tokens=plan["decode"], temperature=0.0,
                           fixed_length=True)
    return SinkLLM(model, tokenizer, device, settings, slots=max(plan["batches"]) + 1, graphs=graphs,
                   compile=compile_)


async def _bench_one(llm, plan: dict[str, Any], device: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    await llm.warm_up(lambda line: None)
    capture_s = time.perf_counter() - t0
    run = llm.scheduler.run
    figures: dict[str, Any] = await run(_single_session, llm, plan)
    figures["graphs_captured"] = llm.engine.graphs.captured
    figures["compiled"] = llm.engine.graphs.compiled
    figures["capture_s"] = round(capture_s, 2)
    figures["layers"] = llm.engine.num_layers
    figures["ops_per_step"] = await run(llm.engine.ops_per_step, 1)  # eager kernels (opcount); the budget test's count
    if llm.engine.graphs.compiled:  # the fused layers compute what the plain ones do (up to rounding)
        figures["fused_vs_unfused_rel_err"] = await run(fusion.agreement, llm.engine.decoder, llm.engine.kv)
        print(f"  fused layers vs unfused: relative difference {figures['fused_vs_unfused_rel_err']:.2e}")
    history = _history(llm, plan["window"] // 2)
    batches = []
    for b in plan["batches"]:
        row, texts = await _batch(llm, history, b)
        row["ops_per_step"] = await run(llm.engine.ops_per_step, b)
        row["floor_fraction"] = floor_fraction(llm.engine.step_bytes(b, row["attention_length"]),
                                               row["step_ms"] / 1e3, device)
        if llm.engine.graphs.captured:  # the same, eager, side by side
            llm.engine.graphs.eager = llm.engine.prefill_graphs.eager = True  # the decode steps and the passes
            try:
                eager, eager_texts = await _batch(llm, history, b)
            finally:
                llm.engine.graphs.eager = llm.engine.prefill_graphs.eager = False
            row.update({f"{k}_eager": v for k, v in eager.items() if k != "batch"})
            # greedy replies: the graph replays must say exactly what the eager steps say
            row["captured_equals_eager"] = texts == eager_texts
        batches.append(row)
        floor = "" if row["floor_fraction"] is None else f", {100 * row['floor_fraction']:.0f}% of the bandwidth floor"
        print(f"  batch {b:>3}: step {row['step_ms']:.2f} ms, {row['per_session_per_s']:.1f} tok/s per session, "
              f"{row['aggregate_per_s']:.0f} tok/s in all{floor}, first token {row['first_token_ms']:.1f} ms, "
              f"{row['ops_per_step']} eager ops per step"
              + (f" (eager: step {row['step_ms_eager']:.2f} ms, {row['aggregate_per_s_eager']:.0f} tok/s; "
                 f"replies {'equal' if row['captured_equals_eager'] else 'DIFFER'})"
                 if "step_ms_eager" in row else ""), flush=True)
    figures["batches"] = batches
    # the same largest batch in young dialogues (a system prompt and one turn): its steps read the
    # K/V of a short length bucket, not the half-full window's
    largest = max(batches, key=lambda row: row["batch"])
    b = largest["batch"]
    young, _ = await _batch(llm, [], b)
    young["ops_per_step"] = largest["ops_per_step"]
    young["floor_fraction"] = floor_fraction(llm.engine.step_bytes(b, young["attention_length"]),
                                             young["step_ms"] / 1e3, device)
    figures["young"] = young
    print(f"  batch {b:>3}, young dialogues: step {young['step_ms']:.2f} ms over {young['attention_length']} "
          f"positions ({largest['step_ms']:.2f} ms over {largest['attention_length']}), "
          f"{young['aggregate_per_s']:.0f} tok/s in all", flush=True)
    replies = max(1, max(plan["batches"]) // 4)
    figures["scattered"] = scattered = await run(_scattered, llm, history, replies)
    print(f"  {replies} replies among {scattered['rows_held']} listening sessions, on the highest rows: step "
          f"{scattered['step_ms']:.2f} ms as wide as the replies, {scattered['step_ms_to_highest_row']:.2f} ms "
          f"over every row up to the highest (x{scattered['speedup']})", flush=True)
    starts = max(plan["batches"])
    figures["starts"] = together = await _starts(llm, history, starts)
    print(f"  {starts} replies starting in one tick: {together['together_ms']:.1f} ms for all their first tokens in "
          f"{together['passes']} prefill pass(es), {together['alone_ms']:.1f} ms one by one "
          f"(x{together['speedup']})", flush=True)
    figures["device"] = device
    return figures


async def _starts(llm, history: list[Message], n: int) -> dict[str, Any]:
    """``n`` sessions that heard the user's words start their replies in the same tick (their
    prefills up to the generation prompt run as one pass, their first tokens drawn together) against
    ``n`` such sessions starting one after another (a pass each): the wall time until every first
    token is drawn, and the prefill passes the batch took."""
    from duplex.llm.stream import Ask

    messages = frozen(history + [Message("user", USER_TURN)])

    async def heard() -> list:
        streams = [llm.new_stream(SYSTEM) for _ in range(n)]
        for s in streams:
            await s.listen(messages)
        return streams

    streams = await heard()
    passes = llm.prefills.batches
    t0 = time.perf_counter()
    await asyncio.gather(*(llm.prefills.submit(Ask(s, messages, _begin(s)), now=True) for s in streams))
    together = time.perf_counter() - t0
    passes = llm.prefills.batches - passes
    for s in streams:
        await s.aclose()
    streams = await heard()
    t0 = time.perf_counter()
    for s in streams:
        await llm.prefills.submit(Ask(s, messages, _begin(s)), now=True)
    alone = time.perf_counter() - t0
    for s in streams:
        await s.aclose()
    return {"sessions": n, "together_ms": round(together * 1e3, 2), "alone_ms": round(alone * 1e3, 2),
            "passes": passes, "speedup": round(alone / together, 1)}


async def _batch(llm, history: list[Message], b: int) -> tuple[dict[str, Any], list[str]]:
    """``b`` sessions reply at once (fixed length); then one more reply starts while they decode.
    Returns the figures and the ``b`` replies' texts."""
    from duplex.llm.stream import Ask

    streams = [llm.new_stream(SYSTEM) for _ in range(b + 1)]
    user = Message("user", USER_TURN)
    try:
        for s in streams:
            await s.listen(history + [user])
        messages = history + [user]
        first: list[float] = []
        decoding = asyncio.Event()

        async def reply(stream) -> str:
            pieces = []
            async for piece in stream.reply(messages):
                pieces.append(piece)
                decoding.set()
            return "".join(pieces)

        ticks0 = llm.scheduler.ticks
        start = time.perf_counter()
        tasks = [asyncio.create_task(reply(s)) for s in streams[:b]]
        await decoding.wait()  # a new reply joins while the others decode: its prefill runs between steps
        joiner = streams[b]
        t_join = time.perf_counter()
        await llm.prefills.submit(Ask(joiner, frozen(messages), _begin(joiner)), now=True)
        first.append(time.perf_counter() - t_join)
        texts = list(await asyncio.gather(*tasks))
        elapsed = time.perf_counter() - start
        ticks = [t for t in llm.scheduler.ticks_since(ticks0) if t.rows]
        steps, tokens = len(ticks), sum(t.rows for t in ticks)
        # the step alone: ticks with every reply in it and no job (the joiner's reply start) beside it
        steady = [t.seconds for t in ticks if t.rows >= b and not t.jobs] or [t.seconds for t in ticks]
    finally:
        for s in streams:
            await s.aclose()
    step_s = statistics.median(steady)
    return {"batch": b, "step_ms": round(step_s * 1e3, 3), "per_session_per_s": round(1.0 / step_s, 2),
            "aggregate_per_s": round(b / step_s, 1), "wall_aggregate_per_s": round(tokens / elapsed, 1),
            "first_token_ms": round(first[0] * 1e3, 2), "steps": steps,
            "attention_length": llm.engine.graphs.last[1]}, texts


def _begin(stream):
    """A reply object as ``reply()`` makes it (for timing its first token alone)."""
    from duplex.llm.engine import TextDecoder
    from duplex.llm.stream import _Reply

    reply = _Reply(TextDecoder(stream.model.engine.tokenizer))
    stream._active = reply
    return reply


def _single_session(llm, plan: dict[str, Any]) -> dict[str, Any]:
    """TTFT, the sink cache's decode cost and recomputation (worker thread, one session at a time)."""
    window = plan["window"]
    history = _history(llm, window // 2)
    user = Message("user", USER_TURN)
    words = USER_TURN.split()
    probe = llm.new_context(SYSTEM)
    probe.sync(history)
    history_tokens = probe.dialogue.length
    probe.sync(history + [user], generation_prompt=True)
    turn_tokens = probe.dialogue.length - history_tokens
    probe.close()

    def first_token(ctx) -> float:
        t0 = time.perf_counter()
        _first(ctx.sync(history + [user], generation_prompt=True))
        elapsed = time.perf_counter() - t0
        ctx.close()
        return elapsed

    first_token(llm.new_context(SYSTEM))  # warm-up
    inc, turn_end, cold, inc_tail = [], [], [], []
    for _ in range(plan["repeats"]):
        ctx = llm.new_context(SYSTEM)
        ctx.sync(history)
        for i in range(plan["partial_every"], len(words) + 1, plan["partial_every"]):  # not timed: the
            # user is still speaking; ASR partials arrive every few words
            ctx.sync(history + [Message("user", " ".join(words[:i]))], open_last=True)
        before = ctx.prefilled
        inc_tail.append(-before)
        inc.append(first_token(ctx))
        inc_tail[-1] += ctx.prefilled
        ctx = llm.new_context(SYSTEM)
        ctx.sync(history)
        turn_end.append(first_token(ctx))
        cold.append(first_token(llm.new_context(SYSTEM)))

    sink_s, plain_s, steps, evictions = _decode_cost(llm, history, plan["long_decode"])
    rec_s = _recompute(llm, window, plan["recompute_steps"])
    med = statistics.median
    return {
        "window": window, "history_tokens": history_tokens, "turn_tokens": turn_tokens,
        "ttft_incremental_ms": round(1e3 * med(inc), 2), "ttft_turn_end_ms": round(1e3 * med(turn_end), 2),
        "ttft_cold_ms": round(1e3 * med(cold), 2), "incremental_tokens_at_turn_end": int(med(inc_tail)),
        "ttft_speedup_vs_turn_end": round(med(turn_end) / med(inc), 2),
        "ttft_speedup_vs_cold": round(med(cold) / med(inc), 2),
        "decode_sink_tok_s": round(steps / sink_s, 2), "decode_sink_evictions": evictions,
        "decode_plain_tok_s": round(steps / plain_s, 2), "decode_steps": steps,
        "sink_overhead_pct": round(100.0 * (sink_s / plain_s - 1.0), 2),
        "recompute_tok_s": round(1.0 / rec_s, 3),
        "speedup_vs_sliding_recompute": round(rec_s / (sink_s / steps), 1),
        "cache_mib_per_session": round(llm.engine.kv.slot_nbytes() / 2**20, 2),
        "dtype": str(llm.engine.dtype).replace("torch.", ""),
    }


def _first(logits) -> int:
    return int(logits.argmax())  # int(): waits for the device


def _history(llm, tokens: int) -> list[Message]:
    """Alternating messages whose rendering is about ``tokens`` tokens long."""
    from duplex.llm.chat import DialogueTokens

    dialogue = DialogueTokens(llm.format, SYSTEM)
    msgs: list[Message] = []
    i = 0
    while True:
        candidate = msgs + [Message("user" if i % 2 == 0 else "assistant", f"{LINES[i % len(LINES)]} ({i})")]
        dialogue.update(candidate)
        if dialogue.length > tokens and msgs and msgs[-1].role == "assistant":
            return msgs
        msgs, i = candidate, i + 1


def _fill(llm, ctx, history: list[Message], total: int) -> None:
    """Fill ``ctx`` with the dialogue and then filler tokens up to ``total`` slots."""
    ctx.sync(history)
    filler = llm.format.encode(" ".join(LINES))
    while ctx.length < total:
        ctx.extend(filler[: total - ctx.length])


def _decode_cost(llm, history: list[Message], n: int) -> tuple[float, float, int, int]:
    """``n`` greedy decode steps of one session through the engine's batched step with the cache kept
    full (evicting a chunk at a time), then as many with room to spare (no eviction), on the same
    engine row (so the same step shapes). Returns (sink seconds, plain seconds, steps, evictions)."""
    from duplex.llm.engine import DecodeRequest, Draw

    engine = llm.engine
    window = llm.settings.window
    draw = Draw(0.0, 1.0, 0, 0)

    def run(ctx, steps: int) -> float:
        token = _first(ctx.logits)
        for warm in (True, False):
            t0 = time.perf_counter()
            for _ in range(2 if warm else steps):
                ctx.reserve(1)
                nxt = engine.decode([DecodeRequest(ctx.cache, token, draw)])[0]
                ctx.commit_decoded(token)
                token = nxt
        return time.perf_counter() - t0

    sink = llm.new_context(SYSTEM)
    _fill(llm, sink, history, window - 1)
    sink_s = run(sink, n)
    evictions = sink.evictions
    sink.close()
    plain = llm.new_context(SYSTEM)
    steps = min(n, window - plain.sink - 8)  # the plain session never fills up
    _fill(llm, plain, history[:2], window - steps - 4)
    plain_s = run(plain, steps) * n / steps
    plain.close()
    return sink_s, plain_s, n, evictions


def _scattered(llm, history: list[Message], replies: int) -> dict[str, Any]:
    """Decode steps of ``replies`` sessions on the highest rows while every row is held by a session
    that listens (as in a server: each session keeps its LLM row for its whole life): the step as
    wide as the replies (their rows gathered by index) against a step over every row up to the
    highest one replying (what a step sized by the highest row ran). Medians of job-free steps."""
    from duplex.llm.engine import DecodeRequest, Draw

    engine = llm.engine
    contexts = sorted((llm.new_context(SYSTEM) for _ in range(engine.free_slots)), key=lambda c: c.cache.row)
    draw = Draw(0.0, 1.0, 0, 0)

    def step_s(chosen) -> float:
        requests = [DecodeRequest(ctx.cache, _first(ctx.logits), draw) for ctx in chosen]
        times = []
        for _ in range(9):  # the slots' lengths are not advanced: every step writes the same position
            t0 = time.perf_counter()
            engine.decode(requests)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])

    try:
        for ctx in contexts:
            _fill(llm, ctx, history, llm.settings.window // 2)
        replying = contexts[-replies:]
        narrow = step_s(replying)
        wide = step_s(contexts)
    finally:
        for ctx in contexts:
            ctx.close()
    return {"replies": replies, "rows_held": len(contexts), "step_ms": round(narrow * 1e3, 3),
            "step_ms_to_highest_row": round(wide * 1e3, 3), "speedup": round(wide / narrow, 2)}


def _recompute(llm, window: int, steps: int) -> float:
    """Seconds per token when every token re-runs the model over the last ``window`` tokens."""
    import torch

    engine = llm.engine
    ids = _tokens(llm, window)
    with torch.inference_mode():
        def step() -> None:
            out = engine.model(input_ids=torch.tensor([ids[-window:]], device=engine.device), use_cache=False,
                               logits_to_keep=1)
            ids.append(int(out.logits[0, -1, : engine.vocab].argmax()))

        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps


def _tokens(llm, n: int) -> list[int]:
    base = llm.format.encode(" ".join(LINES)).tolist()
    return (base * (n // len(base) + 1))[:n]


def _print(arch: str, f: dict[str, Any]) -> None:
    print(f"\n{arch} ({f['dtype']} on {f['device']}), window {f['window']}, history {f['history_tokens']} "
          f"tokens, user turn {f['turn_tokens']} tokens; graphs captured: {f['graphs_captured']} "
          f"({f['capture_s']} s)")
    print(f"  TTFT after the turn: incremental {f['ttft_incremental_ms']:.1f} ms "
          f"({f['incremental_tokens_at_turn_end']} tokens left to prefill), turn-end prefill "
          f"{f['ttft_turn_end_ms']:.1f} ms, cold {f['ttft_cold_ms']:.1f} ms  -> "
          f"x{f['ttft_speedup_vs_turn_end']} / x{f['ttft_speedup_vs_cold']}")
    print(f"  decode, one session: sink cache {f['decode_sink_tok_s']:.1f} tok/s over {f['decode_steps']} steps "
          f"({f['decode_sink_evictions']} evictions), no eviction {f['decode_plain_tok_s']:.1f} tok/s "
          f"(sink overhead {f['sink_overhead_pct']:+.1f}%)")
    print(f"  sliding-window recomputation {f['recompute_tok_s']:.2f} tok/s -> sink cache "
          f"x{f['speedup_vs_sliding_recompute']} faster")
    print(f"  cache memory: {f['cache_mib_per_session']} MiB per session (constant)")
    b1 = next((r for r in f["batches"] if r["batch"] == 1), None)
    if b1:
        for r in f["batches"]:
            if r["batch"] > 1:
                print(f"  batch {r['batch']} aggregate = x{r['aggregate_per_s'] / b1['aggregate_per_s']:.1f} batch 1")
