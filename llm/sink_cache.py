"""Attention-sink KV cache (StreamingLLM) on the transformers 5.x ``Cache`` / cache-layer API.

The cache holds ``capacity`` slots per layer, allocated up front (constant memory, fixed addresses).
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

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

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


class SinkLayer(CacheLayerMixin):
    """One layer's slots: ``keys``/``values`` ``[B, H_kv, capacity, D]``, the first ``length`` in use."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = torch.zeros((b, h, self.capacity, d), dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros((b, h, self.capacity, value_states.shape[-1]), dtype=value_states.dtype,
                                  device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"sink cache overflow: {self.length} + {n} > {self.capacity} slots; "
                               "evict before writing")
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers' legacy form: the size to keep
            self.length = min(self.length, tokens_to_remove)
        else:
            self.length = max(0, self.length + tokens_to_remove)

    def evict(self, start: int, count: int, rotation: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Drop slots ``[start, start + count)``; later slots move down ``count`` places and their keys
        are rotated by ``rotation`` (cos, sin), or only moved when it is None."""
        if count <= 0 or not self.is_initialized:
            return
        end = self.length
        moved_k = self.keys[:, :, start + count:end]  # [B, H, T, D]
        moved_k = rotate_keys(moved_k, *rotation) if rotation is not None else moved_k.clone()
        self.keys[:, :, start:end - count] = moved_k
        self.values[:, :, start:end - count] = self.values[:, :, start + count:end].clone()
        self.length = end - count


class SinkCache(Cache):
    """The attention-sink cache: one :class:`SinkLayer` per model layer, plus eviction and rollback."""

    def __init__(self, num_layers: int, capacity: int, inv_freq: torch.Tensor, *, rerotate: bool = True):
        super().__init__(layers=[SinkLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity
        self.inv_freq = inv_freq.to(torch.float32)
        self.rerotate = rerotate  # False only for the negative control in tests

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` slots (cheap: later writes overwrite the rest)."""
        if not (0 <= length <= self.length):
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        for layer in self.layers:
            layer.length = length

    def evict(self, start: int, count: int) -> None:
        """Drop ``count`` slots from ``start`` on; positions after them shift down by ``count``."""
        if not (0 <= start and count >= 0 and start + count <= self.length):
            raise ValueError(f"cannot evict [{start}, {start + count}) from {self.length} slots")
        if count == 0:
            return
        first = self.layers[0]
        rotation = None
        if self.rerotate and first.is_initialized:
            rotation = rope_shift(-count, self.inv_freq, first.keys.device)
        for layer in self.layers:
            layer.evict(start, count, rotation)

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (constant once allocated)."""
        total = 0
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                if t is not None:
                    total += t.untyped_storage().nbytes()
        return total

