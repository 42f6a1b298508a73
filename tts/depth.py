"""CSM's depth decoder as one lean loop: the hot path of every frame.

Per frame the depth decoder runs once per codebook after the first (31 steps for CSM-1B), each a pass
through its layers for a single position, so per-call overhead matters more than arithmetic. This
module reads the weights of transformers' ``CsmDepthDecoderForCausalLM`` once (q/k/v and gate/up
fused into one matrix each, RoPE tables for every position precomputed) and runs the steps with a
KV buffer allocated up front for the frame's ``K`` positions. The numbers are those of the HF model
(tests compare codes with transformers' own CSM ``generate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class _Layer:
    norm1: torch.Tensor
    eps1: float
    qkv: torch.Tensor  # [(H + 2 * H_kv) * D, hidden]
    out: torch.Tensor
    norm2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor  # [2 * I, hidden]
    down: torch.Tensor


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    import torch

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DepthDecoder:
    """Samples codebooks 1..K-1 of a frame from the backbone's hidden state and codebook 0."""

    def __init__(self, depth) -> None:
        import torch

        from transformers.activations import ACT2FN

        cfg = depth.config
        inner = depth.model
        if cfg.attention_bias or cfg.mlp_bias:
            raise ValueError("the lean depth decoder supports CSM's bias-free layers only")
        self.num_codebooks = int(cfg.num_codebooks)
        self.vocab = int(cfg.vocab_size)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.act: Callable = ACT2FN[cfg.hidden_act]
        self.layers = [
            _Layer(norm1=layer.input_layernorm.weight, eps1=layer.input_layernorm.variance_epsilon,
                   qkv=torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                  layer.self_attn.v_proj.weight]),
                   out=layer.self_attn.o_proj.weight, norm2=layer.post_attention_layernorm.weight,
                   eps2=layer.post_attention_layernorm.variance_epsilon,
                   gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                   down=layer.mlp.down_proj.weight)
            for layer in inner.layers]
        self.embed = inner.embed_tokens.weight  # [K * V, H_backbone]
        self.project = inner.inputs_embeds_projector.weight  # [hidden, H_backbone]
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.codebook_heads = depth.codebooks_head.weight  # [K - 1, hidden, V]
        positions = torch.arange(self.num_codebooks, device=self.embed.device)[None]
        cos, sin = inner.rotary_emb(self.project, position_ids=positions)  # [1, K, D]
        self.cos, self.sin = cos[:, None], sin[:, None]  # [1, 1, K, D]

    def sample(self, hidden: torch.Tensor, first: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
        """``hidden`` ``[1, H_backbone]``, ``first`` ``[1]`` -> the frame's codes ``[K]``.

        ``draw(logits [1, V]) -> [1]`` picks a code (it restricts to the codec's codes and samples)."""
        import torch
        import torch.nn.functional as F

        n = len(self.layers)
        shape = (n, 1, self.kv_heads, self.num_codebooks, self.head_dim)
        keys = hidden.new_zeros(shape)
        values = hidden.new_zeros(shape)
        x = F.embedding(first, self.embed)  # [1, H_backbone]
        x = torch.stack([hidden, x], dim=1)  # [1, 2, H_backbone]: positions 0 and 1
        codes = [first]
        start = 0
        for index in range(1, self.num_codebooks):
            x = F.linear(x, self.project)  # [1, T, hidden]
            steps = x.shape[1]
            end = start + steps
            cos, sin = self.cos[:, :, start:end], self.sin[:, :, start:end]
            for i, layer in enumerate(self.layers):
                h = _rms_norm(x, layer.norm1, layer.eps1)
                q, k, v = F.linear(h, layer.qkv).view(1, steps, -1, self.head_dim).transpose(1, 2).split(
                    [self.heads, self.kv_heads, self.kv_heads], dim=1)
                q = q * cos + _rotate_half(q) * sin
                keys[i, :, :, start:end] = k * cos + _rotate_half(k) * sin
                values[i, :, :, start:end] = v
                attn = F.scaled_dot_product_attention(q, keys[i, :, :, :end], values[i, :, :, :end],
                                                      is_causal=steps > 1, enable_gqa=True)
                x = x + F.linear(attn.transpose(1, 2).reshape(1, steps, -1), layer.out)
                gate, up = F.linear(_rms_norm(x, layer.norm2, layer.eps2), layer.gate_up).chunk(2, dim=-1)
                x = x + F.linear(self.act(gate) * up, layer.down)
            h = _rms_norm(x[:, -1], self.norm, self.norm_eps)  # [1, hidden]
            code = draw(h @ self.codebook_heads[index - 1])
            codes.append(code)
            x = F.embedding(code + index * self.vocab, self.embed)[:, None]  # [1, 1, H_backbone]
            start = end
        return torch.cat(codes)
