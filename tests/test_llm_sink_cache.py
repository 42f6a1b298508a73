"""The attention-sink KV cache: exactness against an independent reference, constant memory, errors."""

from __future__ import annotations

import pytest
import torch

from duplex.errors import ConfigError
from duplex.engine.decoder import SlotKV
from duplex.llm.sink_cache import SinkSlot, rope_inv_freq, rope_shift, rotate_keys
from duplex.stages import Message
from llm_fixtures import (  # noqa: F401 (fixtures)
    ARCHS, SHORT_SYSTEM, ReferenceDecoder, Step, held_indices, make_llm, tiny_checkpoints,
    single_torch_thread,
)


def _sink_run(llm, *, rerotate: bool, n_tokens: int = 300, seed: int = 0):
    """Feed random tokens through a small sink context in decode-sized pieces (1-5 tokens), with
    evictions on the way; returns (tokens, steps, logits after each step, context)."""
    ctx = llm.new_context(SHORT_SYSTEM, rerotate=rerotate)
    system = ctx.dialogue.ids(0, ctx.sink).tolist()
    g = torch.Generator().manual_seed(seed)
    tokens = system + torch.randint(0, llm.engine.vocab, (n_tokens,), generator=g).tolist()
    sizes = [len(system) + 10]
    while sum(sizes) < len(tokens):
        sizes.append(int(torch.randint(1, 6, (1,), generator=g)))
    steps, logits, pos = [], [], 0
    for n in sizes:
        piece = tokens[pos:pos + n]
        if not piece:
            break
        logits.append(ctx.extend(piece).clone())
        held = held_indices(ctx)
        assert held[-len(piece):] == list(range(pos, pos + len(piece)))
        steps.append(Step(held[:-len(piece)], held[-len(piece):]))
        pos += len(piece)
    return tokens, steps, logits, ctx


@pytest.mark.parametrize("arch", ARCHS)
def test_sink_decode_matches_independent_reference(make_llm, tiny_checkpoints, arch):
    """Decoding through the sink cache across many evictions gives the logits of attention over
    exactly the kept tokens at their re-assigned positions (keys rotated afresh from pre-RoPE keys,
    never re-rotated) to ~1e-5; the same run without re-rotation differs by orders of magnitude."""
    llm = make_llm(arch, window=64, max_reply_tokens=8)
    model = tiny_checkpoints[arch][0]
    tokens, steps, logits, ctx = _sink_run(llm, rerotate=True)
    assert ctx.evictions >= 5 and ctx.length <= 64
    assert held_indices(ctx)[:ctx.sink] == list(range(ctx.sink))  # the sink never moved
    reference = ReferenceDecoder(model).run(tokens, steps)
    err = max(float((a - b).abs().max()) for a, b in zip(logits, reference))
    assert err < 2e-5, err

    tokens2, steps2, stale, ctx2 = _sink_run(llm, rerotate=False)
    assert steps2 == steps  # same schedule, only the rotation differs
    first_evicted = next(i for i, s in enumerate(steps) if s.held != list(range(len(s.held))))
    wrong = max(float((a - b).abs().max()) for a, b in zip(stale[first_evicted:], reference[first_evicted:]))
    assert wrong > 1e-2, wrong
    before = max(float((a - b).abs().max()) for a, b in zip(stale[:first_evicted], reference[:first_evicted]))
    assert before < 2e-5  # identical until the first eviction


def test_rotation_composes_and_matches_fresh_rope():
    """Rotating a key written at position p by -n equals writing it at p - n (rotate_half RoPE)."""
    torch.manual_seed(0)
    d = 16
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    k = torch.randn(2, 5, d)

    def at(x, p):
        return rotate_keys(x, *rope_shift(p, inv_freq, x.device))

    assert torch.allclose(at(at(k, 37), -12), at(k, 25), atol=1e-5)
    assert not torch.allclose(at(k, 37), at(k, 25), atol=1e-2)


def test_truncate_and_evict_bookkeeping():
    """Truncation only moves the length (no copy); eviction moves later slots of its own row down by
    the count and leaves the other rows of the pool alone."""
    inv_freq = torch.ones(2)
    k = torch.zeros(3, 1, 9, 4)  # 2 rows + scratch, 8 positions + scratch
    k[:, 0, :6] = torch.arange(6, dtype=torch.float32)[:, None]
    pool = SlotKV([torch.stack([k, k], dim=1)])  # keys and values of each row side by side
    slot = SinkSlot(pool, 1, inv_freq, rerotate=False, length=6)
    ptr = pool.keys[0].data_ptr()
    slot.evict(2, 3)  # drop slots 2, 3, 4
    assert slot.length == 3
    assert pool.keys[0][1, 0, :3, 0].tolist() == [0.0, 1.0, 5.0]
    assert pool.keys[0][0, 0, :6, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # row 0 untouched
    slot.truncate(1)
    assert slot.length == 1 and pool.keys[0].data_ptr() == ptr
    with pytest.raises(ValueError, match="cannot evict"):
        slot.evict(0, 2)


async def test_memory_after_100k_tokens_equals_memory_after_first_eviction(make_llm):
    """A dialogue of 100k tokens through listen(): the cache's memory (tensor bytes, buffer
    addresses, held ids) after it equals the memory right after the first eviction, and the held
    tokens always map exactly onto the dialogue."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=16)
    stream = llm.new_stream(SHORT_SYSTEM)
    line = "Could you tell me the weather for tomorrow? It will be sunny in the morning and rainy later. "
    messages: list[Message] = []
    snapshot = None
    i = 0
    while True:
        messages.append(Message("user" if i % 2 == 0 else "assistant", f"{i} {line * 3}"))
        i += 1
        await stream.listen(messages)
        ctx = stream.context
        if snapshot is None and ctx.evictions:
            snapshot = (stream.stats()["cache_bytes"], [k.data_ptr() for k in ctx.cache.kv.keys], ctx.cache.row,
                        ctx.capacity)
        if ctx.end >= 100_000:
            break
    assert snapshot is not None and ctx.evictions > 100
    stats = stream.stats()
    assert (stats["cache_bytes"], [k.data_ptr() for k in ctx.cache.kv.keys], ctx.cache.row,
            ctx.capacity) == snapshot
    assert stats["dialogue_tokens"] >= 100_000 and stats["cache_tokens"] <= 256
    # The dialogue bookkeeping keeps the token ids of the window's messages only.
    assert ctx.dialogue.retained() <= ctx.capacity + 2 * max(ctx.dialogue.sizes)
    assert ctx.length <= ctx.capacity == 256
    assert ctx.ids[:ctx.sink] == ctx.dialogue.ids(0, ctx.sink).tolist()
    assert ctx.ids[ctx.sink:] == ctx.dialogue.ids(ctx.offset, ctx.end).tolist()
    assert ctx.offset in ctx.dialogue.boundaries()  # evicted whole messages here
    await stream.aclose()


def test_models_without_rope_are_refused():
    """A causal LM without rotary embeddings (GPT-2) or with sliding-window layers gets a clear error."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(ConfigError, match="rotary"):
        rope_inv_freq(gpt2)
    sliding = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=8, max_window_layers=0))
    with pytest.raises(ConfigError, match="full-attention"):
        rope_inv_freq(sliding)


def test_mistral_window_beyond_its_attention_window_is_refused(tiny_checkpoints):
    """A Mistral model attends over a sliding window: a sink cache larger than it is refused, one
    within it is accepted."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from duplex.llm.model import LLMSettings, SinkLLM

    tokenizer = tiny_checkpoints["qwen2"][1]
    model = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=96))
    with pytest.raises(ConfigError, match="attention window of 96"):
        SinkLLM(model, tokenizer, "cpu", LLMSettings(window=128, max_reply_tokens=16))
    SinkLLM(model, tokenizer, "cpu", LLMSettings(window=96, max_reply_tokens=16)).close()


def test_window_smaller_than_sink_plus_turn_is_refused(make_llm):
    """A window that cannot hold the system prompt (the sink) and one turn is a ConfigError naming
    the minimum."""
    llm = make_llm("qwen2", window=64, max_reply_tokens=40)
    with pytest.raises(ConfigError, match="too small.*use at least"):
        llm.check_system_prompt(SHORT_SYSTEM)
    with pytest.raises(ConfigError, match="too small"):
        llm.new_context(SHORT_SYSTEM)
    assert make_llm("qwen2", window=128, max_reply_tokens=40).check_system_prompt(SHORT_SYSTEM) >= 4
