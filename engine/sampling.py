"""Sampling inside a batched step: no host sync, static shapes, per-row settings and reproducible noise.

Every row draws with its own ``seed`` and ``counter`` (the number of draws it made before), from
noise that is a hash of (seed, counter, token id). The host hashes each row's (seed, counter) into
its *draw key* (:func:`draw_key`, on Python ints or numpy arrays, staged like the step's other
inputs); the step hashes only the key with the token ids, so the two dozen integer kernels of the
row's own hash run nowhere on the device. A session therefore draws exactly the same tokens
whether it is stepped alone or in a batch of any size and composition, and a step can be captured
in a CUDA graph (no torch generator state, no ``.item()``). The draw is the exponential race
``argmax(p / E)``, ``E ~ Exp(1)``, which samples from ``p`` exactly (it is Gumbel-max in another form).

Settings are ``[B]`` tensors: ``temperature`` (0 = greedy), ``top_p`` (1 = off; None = no nucleus step
at all); ``top_k`` is one integer for the whole engine (0 = off), since ``topk`` needs a static ``k``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Ints = Any  # a Python int, a numpy int64 array or a torch long tensor: the hash is the same on each

_MASK = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: a 32-bit value times it stays inside int64


def _mix(x: Ints) -> Ints:
    """A 32-bit integer hash (good avalanche) of values in [0, 2**32), held in int64 (or Python ints)."""
    x = ((x >> 16) ^ x) * _MUL & _MASK
    x = ((x >> 16) ^ x) * _MUL & _MASK
    return (x >> 16) ^ x


def token_keys(vocab: int, device) -> torch.Tensor:
    """The per-token part of the noise hash ``[V]`` (computed once per engine)."""
    import torch

    return _mix(torch.arange(vocab, dtype=torch.int64, device=device) + 0x9E3779B9 & _MASK)


def draw_key(seed: Ints, counter: Ints) -> Ints:
    """The row's part of the noise hash: one value per (seed, counter), made by the host before the
    step (numpy arrays for many counters at once: a TTS frame's one per codebook)."""
    return _mix((seed & _MASK) ^ _mix(counter & _MASK))


def uniform(draws: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1), float32, a pure function of (seed, counter, token id).

    ``draws`` are the rows' :func:`draw_key` values, ``[B]`` (or ``[B, K]``: one counter per
    codebook); ``keys`` are the :func:`token_keys` of the tokens wanted, ``[V]`` for every token or
    ``[B, k]`` for some tokens of each row. The result is ``[B, V]``, ``[B, k]`` or ``[B, K, V]``: a
    token's noise is the same whichever of its neighbours are computed with it. Its values are
    ``(n + 0.5) / 2**23`` for 23 bits ``n`` of the hash, each exact in float32, so none is 0 or 1
    (24 bits rounded the largest to 1.0, whose race weight is infinite)."""
    bits = _mix(keys ^ draws[..., None]) >> 9  # 23 bits
    return (bits + 0.5) * (1.0 / (1 << 23))  # int64 + float: float32, the cast inside the add


def scaled_gumbel(draws: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``T * G``, ``G = -log(E)`` Gumbel noise, for :func:`race`, shaped as :func:`uniform`'s and made
    once for many draws (every codebook of a TTS frame, ``[B, K, V]``) in one pass; ``temperature``
    ``[B]`` (0 or below: no noise, the row's draws are its argmax, as :func:`sample` takes them)."""
    import torch

    log_e = torch.log(-torch.log(uniform(draws, keys)))  # log E, E ~ Exp(1); T * G = -T * log E, exactly
    return log_e * temperature.clamp_min(0).neg().view(-1, *([1] * (log_e.ndim - 1)))


def race(logits: torch.Tensor, noise: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` -> ``[B]`` long: among the top ``top_k`` logits (all
    with 0), the argmax of ``logits + noise`` for the row's :func:`scaled_gumbel` noise ``[B, V]``.

    The same exponential race as :func:`sample`'s, in the log domain: ``argmax(p / E)`` with ``p =
    softmax(l / T)`` is ``argmax(l / T - log E)``, and scaling by ``T > 0`` keeps the argmax, so it
    draws from the same distribution (the tokens may differ where two candidates tie to float
    rounding). Without a nucleus step it needs no probabilities: five kernels a draw (top-k, the
    noise gathered, the sum, its argmax, the id), where :func:`sample` runs eight, and a row of
    temperature 0 (no noise) takes its argmax with no test of its own. The TTS's 32 draws a frame."""
    if top_k and top_k < logits.shape[-1]:
        values, ids = logits.topk(top_k, dim=-1)  # [B, k]
        best = (values + noise.gather(-1, ids)).argmax(dim=-1)
        return ids.gather(-1, best[:, None])[:, 0]
    return (logits + noise).argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None, draws: torch.Tensor,
           keys: torch.Tensor, *, top_k: int = 0) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` -> ``[B]`` long.

    Rows with ``temperature`` 0 take the argmax; the others sample at their temperature from the top
    ``top_k`` logits (if ``top_k``), then from the smallest set of those tokens whose probability
    reaches ``top_p`` (the tokens before the one that crosses it, as nucleus sampling keeps them;
    None: no nucleus step). With ``top_k`` nothing is sorted but the ``k`` kept (``topk`` gives them
    in order) and the noise is hashed for those ``k`` tokens only, from the rows' ``draws`` (their
    :func:`draw_key` values) and the tokens' ``keys``; without it, the whole vocabulary is sorted
    for the nucleus."""
    import torch

    hot = temperature > 0
    temperature = temperature.clamp_min(1e-6)

    vocab = logits.shape[-1]
    if top_k and top_k < vocab:  # in the logits' dtype (the same order as in fp32: the cast is exact);
        values, ids = logits.topk(top_k, dim=-1)  # [B, k], best first; fp32 from the division on
        greedy = ids[:, 0]
    else:
        values, ids = logits.float(), None
        greedy = values.argmax(dim=-1)
    probs = torch.softmax(values / temperature[:, None], dim=-1)  # fp32 (temperature is)
    if top_p is not None:
        off = top_p[:, None] >= 1.0
        if ids is None:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = (sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]) & ~off
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        else:  # already in order
            probs = probs.masked_fill((probs.cumsum(-1) - probs > top_p[:, None]) & ~off, 0.0)
    # the race argmax(p / E), E = -log(u) ~ Exp(1), as argmin(p / log(u)): p / log(u) is -(p / E)
    # exactly, so the same token (ties included: both take the first), one negation fewer
    best = (probs / torch.log(uniform(draws, keys[:vocab] if ids is None else keys[ids]))).argmin(dim=-1)
    drawn = best if ids is None else ids.gather(-1, best[:, None])[:, 0]
    return torch.where(hot, drawn, greedy)
