"""Sampling inside a batched step: no host sync, static shapes, per-row settings and reproducible noise.

Every row draws with its own ``seed`` and ``counter`` (the number of draws it made before), from
noise that is a hash of (seed, counter, token id). A session therefore draws exactly the same tokens
whether it is stepped alone or in a batch of any size and composition, and a step can be captured
in a CUDA graph (no torch generator state, no ``.item()``). The draw is the exponential race
``argmax(p / E)``, ``E ~ Exp(1)``, which samples from ``p`` exactly (it is Gumbel-max in another form).

Settings are ``[B]`` tensors: ``temperature`` (0 = greedy), ``top_p`` (1 = off; None = no nucleus step
at all); ``top_k`` is one integer for the whole engine (0 = off), since ``topk`` needs a static ``k``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_MASK = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: a 32-bit value times it stays inside int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (good avalanche) on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & _MASK
    x = ((x >> 16) ^ x) * _MUL & _MASK
    return (x >> 16) ^ x


def token_keys(vocab: int, device) -> torch.Tensor:
    """The per-token part of the noise hash ``[V]`` (computed once per engine)."""
    import torch

    return _mix(torch.arange(vocab, dtype=torch.int64, device=device) + 0x9E3779B9 & _MASK)


def uniform(seed: torch.Tensor, counter: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1), ``[B, V]`` float32, a pure function of (seed, counter, token id)."""
    import torch

    row = _mix((seed & _MASK) ^ _mix(counter & _MASK))  # [B]
    bits = _mix(keys[None, :] ^ row[:, None]) >> 8  # [B, V], 24 bits
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None, seed: torch.Tensor,
           counter: torch.Tensor, keys: torch.Tensor, *, top_k: int = 0) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` -> ``[B]`` long.

    Rows with ``temperature`` 0 take the argmax; the others sample at their temperature from the top
    ``top_k`` logits (if ``top_k``), then from the smallest set of tokens whose probability reaches
    ``top_p`` (the tokens before the one that crosses it, as nucleus sampling keeps them; None: no
    nucleus step, and no sort)."""
    import torch

    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = (sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]) & (top_p[:, None] < 1.0)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    race = probs / -torch.log(uniform(seed, counter, keys[: logits.shape[-1]]))
    drawn = race.argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)
