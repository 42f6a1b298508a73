"""Shared fixtures of the LLM tests: tiny checkpoints loaded once, SinkLLM factories, and an
independent reference decoder for the attention-sink cache.

The reference never re-rotates anything: it keeps every token's key *before* RoPE and, for each
query, applies RoPE afresh at the positions the kept tokens have at that moment (their rank among the
kept tokens), with frequencies computed from the config. Attention, GQA and the residual stream are
written out here; only the linear layers, norms and MLPs are the model's own modules.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch

from duplex.llm.context import SinkContext
from duplex.llm.loader import load_checkpoint
from duplex.llm.model import LLMSettings, SinkLLM
from duplex.llm.tiny import tiny_model_path

ARCHS = ("qwen2", "llama")
SHORT_SYSTEM = "Be brief."


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Tiny models run on one intra-op thread: their ops are too small to split, and spinning
    OpenMP threads on a busy machine slow them down tenfold. Restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _checkpoint(arch: str) -> tuple[object, object]:
    # Cached here, not only by the fixture: each test module that imports a fixture gets its own copy.
    return load_checkpoint(str(tiny_model_path(arch)), "cpu")


@pytest.fixture(scope="session")
def tiny_checkpoints() -> dict[str, tuple[object, object]]:
    """(model, tokenizer) of each tiny architecture, built once under cache_dir() and loaded back."""
    return {arch: _checkpoint(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def make_llm(tiny_checkpoints) -> Iterator:
    """``make_llm(arch, **settings) -> SinkLLM`` on a tiny checkpoint; workers closed at the end."""
    made: list[SinkLLM] = []

    def make(arch: str = "qwen2", slots: int = 8, **settings) -> SinkLLM:
        model, tokenizer = tiny_checkpoints[arch]
        # the step run ahead as on a GPU (the agent runs it only there): every LLM test covers it
        llm = SinkLLM(model, tokenizer, "cpu", LLMSettings(**settings), slots=slots, ahead=True)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def kv_of(ctx: SinkContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values a context holds, per layer ``([H, T, D], [H, T, D])``."""
    return [(ctx.cache.keys(i).clone(), ctx.cache.values(i).clone()) for i in range(ctx.engine.num_layers)]


def max_kv_diff(a: SinkContext, b: SinkContext) -> float:
    assert a.length == b.length
    return max(float((x - y).abs().max()) for pa, pb in zip(kv_of(a), kv_of(b)) for x, y in zip(pa, pb))


@dataclass
class Step:
    """One forward pass of the sink run: which dialogue tokens were held before it, which it ran."""

    held: list[int]
    chunk: list[int]


class ReferenceDecoder:
    """Causal attention over exactly the given kept tokens at their re-assigned positions."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.model = model
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        theta = cfg.rope_parameters["rope_theta"]
        d = self.head_dim
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        self.keys: list[dict[int, torch.Tensor]] = [{} for _ in model.model.layers]  # before RoPE
        self.values: list[dict[int, torch.Tensor]] = [{} for _ in model.model.layers]

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x ``[T, H, D]`` rotated to ``positions`` ``[T]`` (computed in fp64)."""
        angle = positions.to(torch.float64)[:, None] * self.inv_freq[None]  # [T, D/2]
        cos, sin = angle.cos(), angle.sin()
        x = x.to(torch.float64)
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(torch.float32)

    @torch.inference_mode()
    def run(self, tokens: Sequence[int], steps: Sequence[Step]) -> list[torch.Tensor]:
        """Logits after the last token of each step, tokens indexed by dialogue position."""
        out = []
        for step in steps:
            visible = list(step.held)
            x = None
            for j in step.chunk:
                x = self._token(tokens[j], j, visible)
                visible.append(j)
            m = self.model
            out.append(m.lm_head(m.model.norm(x)).float())
        return out

    def _token(self, token: int, j: int, visible: list[int]) -> torch.Tensor:
        m = self.model
        x = m.model.embed_tokens(torch.tensor(token))  # [hidden]
        group = self.heads // self.kv_heads
        for li, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, self.heads, self.head_dim)
            self.keys[li][j] = attn.k_proj(h).view(self.kv_heads, self.head_dim)
            self.values[li][j] = attn.v_proj(h).view(self.kv_heads, self.head_dim)
            order = visible + [j]
            k = torch.stack([self.keys[li][i] for i in order])  # [T, Hkv, D]
            v = torch.stack([self.values[li][i] for i in order])  # [T, Hkv, D]
            k = self.rope(k, torch.arange(len(order)))
            q = self.rope(q, torch.tensor([len(order) - 1]))[0]  # [H, D]
            k = k.repeat_interleave(group, dim=1)  # [T, H, D]
            v = v.repeat_interleave(group, dim=1)
            w = torch.softmax(torch.einsum("hd,thd->ht", q, k) / math.sqrt(self.head_dim), dim=-1)
            o = torch.einsum("ht,thd->hd", w, v).reshape(-1)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x


def held_indices(ctx: SinkContext) -> list[int]:
    """Dialogue indices of the tokens in the cache, in slot order."""
    return list(range(min(ctx.sink, ctx.length))) + list(range(ctx.offset, ctx.end)) if ctx.length > ctx.sink \
        else list(range(ctx.length))
