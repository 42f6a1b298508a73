"""Attention-sink KV cache (StreamingLLM): one session's row of the LLM engine's static K/V buffers.

The cache holds ``capacity`` slots per layer, allocated up front in the engine's pool (constant
memory, fixed addresses, the same shapes for every session).
Slot ``i`` always carries RoPE position ``i``: keys are stored already rotated at their slot's
position, exactly as the model wrote them. The first ``sink`` slots (the system prompt) are never
evicted. Evicting ``n`` slots after the sink moves the survivors ``n`` slots down and rotates their
keys by ``-n`` positions, so positions stay contiguous and the next token simply goes at position
``length``. Rotations compose (``R(p - n) = R(-n) R(p)``), so a shifted key is exactly the key the
model would have written at its new position; the shift is computed from the model's raw
``inv_freq`` in fp32, never from the model's cos/sin (which carry YaRN-type attention scaling).

Truncation (rolling back to an earlier token count) only moves the length: the next write overwrites
the stale slots.

In bf16 each re-rotation rounds the shifted keys once; with chunked eviction a key is shifted a few
times at most on its way through the window (the sink never moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from duplex.engine.decoder import SlotKV
from duplex.errors import ConfigError

# Model families whose attention applies RoPE with ``rotate_half`` over the whole head dimension.
ROPE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# RoPE variants whose frequencies depend on the position range: re-rotation would be wrong.
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_inv_freq(model: Any) -> torch.Tensor:
    """The model's raw RoPE inverse frequencies in fp32, ``[head_dim // 2]``; clear errors otherwise."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if model_type not in ROPE_FAMILIES or rotary is None or not hasattr(rotary, "inv_freq"):
        raise ConfigError(f"the attention-sink cache needs a causal LM with rotary position embeddings "
                          f"({', '.join(ROPE_FAMILIES)}); {model_type!r} is not one")
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _POSITION_DEPENDENT_ROPE:
        raise ConfigError(f"RoPE type {rope_type!r} changes its frequencies with the position range, "
                          "which the sink cache's re-rotation cannot follow")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"the sink cache supports full-attention layers only; this {model_type} model "
                          f"has {sorted(set(layer_types))}")
    inv_freq = rotary.inv_freq.detach().to(dtype=torch.float32)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if 2 * inv_freq.numel() != head_dim:
        raise ConfigError(f"partial rotary embeddings ({2 * inv_freq.numel()} of {head_dim} dims) are "
                          "not supported by the sink cache")
    return inv_freq


def rope_shift(shift: int, inv_freq: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[D]`` (fp32) of a rotation by ``shift`` positions, from raw inverse frequencies."""
    angle = float(shift) * inv_freq.to(device=device, dtype=torch.float32)  # [D/2]
    emb = torch.cat((angle, angle))  # [D], the rotate_half layout
    return emb.cos(), emb.sin()


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys ``[..., T, D]`` rotated by the angle of ``cos``/``sin`` (``rotate_half`` convention), in fp32."""
    k = keys.to(torch.float32)
    half = k.shape[-1] // 2
    rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * cos + rotated_half * sin).to(keys.dtype)


@dataclass(eq=False)
class SinkSlot:
    """One session's attention-sink cache: row ``row`` of the engine's shared :class:`SlotKV`.

    ``length`` slots are in use; slot ``i`` holds the key written at RoPE position ``i``. The row's
    buffers never change shape or address (they are views into the engine's pool)."""

    kv: SlotKV
    row: int
    inv_freq: torch.Tensor  # fp32 [D/2]
    rerotate: bool = True  # False only for the negative control in tests
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.kv.positions

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` slots (cheap: later writes overwrite the rest)."""
        if not (0 <= length <= self.length):
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        self.length = length

    def evict(self, start: int, count: int) -> None:
        """Drop slots ``[start, start + count)``; later slots move down ``count`` places and their keys
        are rotated by ``-count`` positions (only moved when ``rerotate`` is off)."""
        if not (0 <= start and count >= 0 and start + count <= self.length):
            raise ValueError(f"cannot evict [{start}, {start + count}) from {self.length} slots")
        if count == 0:
            return
        end = self.length
        keys0 = self.kv.keys[0]
        rotation = rope_shift(-count, self.inv_freq, keys0.device) if self.rerotate else None
        for keys, values in zip(self.kv.keys, self.kv.values):
            moved = keys[self.row, :, start + count:end]  # [H, T, D]
            moved = rotate_keys(moved, *rotation) if rotation is not None else moved.clone()
            keys[self.row, :, start:end - count] = moved
            values[self.row, :, start:end - count] = values[self.row, :, start + count:end].clone()
        self.length = end - count

    def keys(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys in use ``[H_kv, length, D]`` (a view; tests and inspection)."""
        return self.kv.keys[layer][self.row, :, :self.length]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv.values[layer][self.row, :, :self.length]

    def nbytes(self) -> int:
        """Bytes of this session's row (constant)."""
        return self.kv.slot_nbytes()
