"""``duplex bench llm``: time to first token, decode rate and memory with the attention-sink cache.

For each architecture (random profile: Qwen2.5-0.5B and 1.5B configurations with random weights;
``--quick``: 0.5B only, short lengths), on fixed token counts (generation never stops early):

- **TTFT after a user turn**, from the end of the turn to the first sampled reply token:
  *incremental* (the user's words were prefilled word by word while they spoke, so only the end of
  the message and the generation prompt remain), *turn-end* (the cache holds the dialogue up to the
  previous turn, the whole user message is prefilled at the end of the turn) and *cold* (no cache:
  the whole dialogue is prefilled);
- **decode tokens/s** with the sink cache kept full (evictions included) against an ordinary growing
  ``DynamicCache`` holding the same number of tokens;
- **speedup over sliding-window recomputation**: re-running the model over the last ``window``
  tokens for every new token (what a model without a sink cache must do to stay within a window);
- **cache memory**: the sink cache's bytes (constant) and the growing cache's after the same decode.

The same code paths as the live stream are timed (``SinkContext.sync`` / ``extend`` and ``sample``).
On CPU compare the ratios; absolute times mean something on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from duplex.stages import Message

QUICK = dict(archs=("qwen2.5-0.5b",), window=192, decode=16, recompute_steps=2, repeats=2, partial_every=4)
FULL = dict(archs=("qwen2.5-0.5b", "qwen2.5-1.5b"), window=2048, decode=64, recompute_steps=4, repeats=3,
            partial_every=1)
SYSTEM = "You are a friendly voice assistant. Answer briefly, in plain spoken English."
LINES = ["Could you tell me the weather for tomorrow in the city?",
         "It will be sunny in the morning and rainy in the evening, so take an umbrella.",
         "I would like to book a table for two people on Friday evening near the river.",
         "Sure, I can help with that. Let me think about it for a moment."]
USER_TURN = ("and so my fellow americans ask not what your country can do for you ask what you can do "
             "for your country and then tell me the time")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    plan = dict(QUICK if args.quick else FULL)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.quick and getattr(args, "llm_window", None):
        plan["window"] = args.llm_window
    archs = (args.llm_model,) if getattr(args, "llm_model", None) else plan["archs"]
    if args.profile in ("tiny", "pretrained") and not getattr(args, "llm_model", None):
        archs = (args.profile,)
    print(f"window {plan['window']} tokens, decode {plan['decode']} tokens, device {device}, "
          f"profile {args.profile}")
    results: dict[str, Any] = {}
    for arch in archs:
        llm = _load(args.profile, arch, device, plan["window"])
        try:
            results[arch] = figures = _bench_one(llm, plan, device)
        finally:
            llm.close()
            del llm
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        _print(arch, figures)
    return results


def _load(profile: str, arch: str, device: str, window: int):
    from duplex.config import AgentConfig
    from duplex.llm.model import LLMSettings, SinkLLM
    from duplex.llm.profiles import load_model

    config = AgentConfig(profile=profile, device=device,  # type: ignore[arg-type]
                         llm_model=None if arch in ("tiny", "pretrained") else arch)
    model, tokenizer = load_model(config, device)
    return SinkLLM(model, tokenizer, device, LLMSettings(window=window, max_reply_tokens=64, temperature=0.0))


def _bench_one(llm, plan: dict[str, Any], device: str) -> dict[str, Any]:
    window = plan["window"]
    history = _history(llm, window // 2)
    user = Message("user", USER_TURN)
    words = USER_TURN.split()
    probe = llm.new_context(SYSTEM)
    probe.sync(history)
    history_tokens = probe.dialogue.length
    probe.sync(history + [user], generation_prompt=True)
    turn_tokens = probe.dialogue.length - history_tokens
    del probe

    def first_token(ctx) -> float:
        t0 = time.perf_counter()
        _first(llm, ctx.sync(history + [user], generation_prompt=True))
        return time.perf_counter() - t0

    _first(llm, llm.new_context(SYSTEM).sync(history + [user], generation_prompt=True))  # warm-up
    inc, turn_end, cold, inc_tail = [], [], [], []
    for _ in range(plan["repeats"]):
        ctx = llm.new_context(SYSTEM)
        ctx.sync(history)
        for i in range(plan["partial_every"], len(words) + 1, plan["partial_every"]):  # not timed: the
            # user is still speaking; ASR partials arrive every few words
            ctx.sync(history + [Message("user", " ".join(words[:i]))], open_last=True)
        before = ctx.prefilled
        inc.append(first_token(ctx))
        inc_tail.append(ctx.prefilled - before)
        ctx = llm.new_context(SYSTEM)
        ctx.sync(history)
        turn_end.append(first_token(ctx))
        cold.append(first_token(llm.new_context(SYSTEM)))

    sink_s, evictions, sink_bytes, dyn_s, dyn_bytes = _decode(llm, history, plan["decode"], window)
    rec_s = _recompute(llm, window, plan["recompute_steps"])
    med = statistics.median
    return {
        "window": window, "history_tokens": history_tokens, "turn_tokens": turn_tokens,
        "ttft_incremental_ms": round(1e3 * med(inc), 2), "ttft_turn_end_ms": round(1e3 * med(turn_end), 2),
        "ttft_cold_ms": round(1e3 * med(cold), 2), "incremental_tokens_at_turn_end": int(med(inc_tail)),
        "ttft_speedup_vs_turn_end": round(med(turn_end) / med(inc), 2),
        "ttft_speedup_vs_cold": round(med(cold) / med(inc), 2),
        "decode_sink_tok_s": round(plan["decode"] / sink_s, 2), "decode_sink_evictions": evictions,
        "decode_dynamic_tok_s": round(plan["decode"] / dyn_s, 2),
        "sink_vs_dynamic_decode": round(dyn_s / sink_s, 3),
        "recompute_tok_s": round(1.0 / rec_s, 3),
        "speedup_vs_sliding_recompute": round(rec_s / (sink_s / plan["decode"]), 1),
        "sink_cache_mib": round(sink_bytes / 2**20, 2), "dynamic_cache_mib": round(dyn_bytes / 2**20, 2),
        "dtype": str(llm.engine.dtype).replace("torch.", ""), "device": device,
    }


def _first(llm, logits) -> int:
    from duplex.llm.engine import sample

    return sample(logits, 0.0, 1.0, None)  # int(): waits for the device


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


def _decode(llm, history: list[Message], n: int, window: int) -> tuple[float, int, int, float, int]:
    """``n`` greedy decode steps with the sink cache kept full (it evicts chunks as it goes) and with
    an ordinary growing cache that starts with as many tokens, steps interleaved so that both see
    the same machine load. Returns (sink seconds, evictions, sink bytes, growing seconds, bytes)."""
    import torch
    from transformers import DynamicCache

    engine = llm.engine
    ctx = llm.new_context(SYSTEM)
    _fill(llm, ctx, history, window - 1)
    cache = DynamicCache(config=engine.model.config)
    ids = ctx.ids[:]
    pos = len(ids)
    with torch.inference_mode():
        out = engine.model(input_ids=torch.tensor([ids], device=engine.device), cache=cache, use_cache=True,
                           logits_to_keep=1)

        def grow(tok: int) -> int:
            nonlocal pos
            o = engine.model(input_ids=torch.tensor([[tok]], device=engine.device),
                             position_ids=torch.tensor([[pos]], device=engine.device), cache=cache,
                             use_cache=True, logits_to_keep=1)
            pos += 1
            return int(o.logits[0, -1, : engine.vocab].argmax())

        a = b = _first(llm, ctx.logits)
        a, b = _first(llm, ctx.extend([a])), grow(int(out.logits[0, -1, : engine.vocab].argmax()))  # warm-up
        evictions = ctx.evictions
        sink_s = grow_s = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            a = _first(llm, ctx.extend([a]))
            t1 = time.perf_counter()
            b = grow(b)
            t2 = time.perf_counter()
            sink_s, grow_s = sink_s + t1 - t0, grow_s + t2 - t1
    grow_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return sink_s, ctx.evictions - evictions, ctx.cache.nbytes(), grow_s, grow_bytes


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
          f"tokens, user turn {f['turn_tokens']} tokens")
    print(f"  TTFT after the turn: incremental {f['ttft_incremental_ms']:.1f} ms "
          f"({f['incremental_tokens_at_turn_end']} tokens left to prefill), turn-end prefill "
          f"{f['ttft_turn_end_ms']:.1f} ms, cold {f['ttft_cold_ms']:.1f} ms  -> "
          f"x{f['ttft_speedup_vs_turn_end']} / x{f['ttft_speedup_vs_cold']}")
    print(f"  decode: sink cache {f['decode_sink_tok_s']:.1f} tok/s ({f['decode_sink_evictions']} evictions), "
          f"growing cache {f['decode_dynamic_tok_s']:.1f} tok/s (sink/growing x{f['sink_vs_dynamic_decode']})")
    print(f"  sliding-window recomputation {f['recompute_tok_s']:.2f} tok/s -> sink cache "
          f"x{f['speedup_vs_sliding_recompute']} faster")
    print(f"  cache memory: sink {f['sink_cache_mib']} MiB (constant), growing {f['dynamic_cache_mib']} MiB")
