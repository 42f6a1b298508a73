"""The in-step sampler: right distribution, top-k / top-p / greedy per row, reproducible per row
whatever else is in the batch."""

from __future__ import annotations

import torch

from duplex.engine.sampling import draw_key, race, sample, scaled_gumbel, token_keys, uniform

V = 8
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])


def _draw(n: int, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 7) -> torch.Tensor:
    """``n`` draws of one session (counters 0..n-1) from LOGITS, as one batch of n rows."""
    keys = token_keys(V, "cpu")
    return sample(LOGITS.expand(n, V), torch.full((n,), temperature), torch.full((n,), top_p),
                  draw_key(torch.full((n,), seed, dtype=torch.long), torch.arange(n)), keys, top_k=top_k)


def test_draws_follow_the_softmax_distribution():
    """20,000 draws land on each token with the softmax probability (each count within 5 sigma; a
    chi-square over 7 degrees of freedom far below its 1e-6 tail), at temperature 1 and 0.5."""
    n = 20_000
    for temperature in (1.0, 0.5):
        p = torch.softmax(LOGITS / temperature, -1)
        counts = torch.bincount(_draw(n, temperature=temperature), minlength=V).float()
        expected = n * p
        sigma = (n * p * (1 - p)).sqrt()
        assert bool(((counts - expected).abs() <= 5 * sigma + 1).all()), (counts, expected)
        chi2 = float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum())
        assert chi2 < 40.0, chi2


def test_top_k_top_p_and_greedy():
    """Top-k draws only the k best tokens; top-p only the smallest set reaching p (the tokens before
    the one that crosses it); temperature 0 always takes the argmax."""
    assert set(_draw(5000, top_k=3).tolist()) == {0, 7, 1}
    p = torch.softmax(LOGITS, -1)
    order = p.argsort(descending=True)
    cum = p[order].cumsum(0)
    nucleus = set(order[: int((cum - p[order] <= 0.8).sum())].tolist())
    assert set(_draw(5000, top_p=0.8).tolist()) == nucleus and len(nucleus) < V
    assert set(_draw(100, temperature=0.0).tolist()) == {0}


def test_a_row_draws_the_same_alone_or_in_any_batch():
    """A row's draw depends only on its own (seed, counter) and settings: alone, or among other rows
    with other settings, it is the same token; another counter draws fresh noise."""
    keys = token_keys(V, "cpu")
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    temps, tops = torch.tensor([1.0, 0.0, 0.7, 1.2, 1.0, 0.9]), torch.tensor([1.0, 1.0, 0.9, 1.0, 0.5, 1.0])
    seeds, counters = torch.tensor([1, 2, 3, 1, 5, 6]), torch.tensor([0, 4, 9, 1, 2, 3])
    batch = sample(logits, temps, tops, draw_key(seeds, counters), keys)
    for i in range(6):
        one = sample(logits[i:i + 1], temps[i:i + 1], tops[i:i + 1], draw_key(seeds[i:i + 1], counters[i:i + 1]), keys)
        assert int(one[0]) == int(batch[i])
    u = uniform(draw_key(torch.tensor([1, 1]), torch.tensor([0, 1])), keys)
    assert not torch.equal(u[0], u[1]) and float(u.min()) > 0.0 and float(u.max()) < 1.0


def test_the_host_makes_the_same_draw_keys_as_the_device_would():
    """A draw key made on the host (a Python int per row, a numpy array of a frame's codebooks) is
    the value the same hash gives on a torch tensor, seeds past 32 bits and negative ones included,
    so a row's noise does not depend on where its key was made."""
    import numpy as np

    seeds = [0, 7, 2**31 + 5, 2**40 + 3, -1, 123_456_789]
    counters = [0, 1, 31, 2**20, 5, 999_999]
    on_device = draw_key(torch.tensor(seeds), torch.tensor(counters)).tolist()
    assert [draw_key(s, c) for s, c in zip(seeds, counters)] == on_device
    frame = draw_key(seeds[2], 3 * 32 + np.arange(32, dtype=np.int64))
    assert frame.tolist() == draw_key(torch.tensor(seeds[2]), 3 * 32 + torch.arange(32)).tolist()
    assert len(set(on_device)) == len(on_device) and all(0 <= k < 2**32 for k in on_device)


def _race(n: int, *, temperature: float = 1.0, top_k: int = 0, seed: int = 7) -> torch.Tensor:
    """``n`` draws of one session through :func:`race` (the TTS's draws), as one batch of n rows."""
    keys = token_keys(V, "cpu")
    noise = scaled_gumbel(draw_key(torch.full((n,), seed, dtype=torch.long), torch.arange(n)), keys,
                          torch.full((n,), temperature))
    return race(LOGITS.expand(n, V), noise, top_k)


def test_the_log_domain_race_draws_the_same_distribution():
    """The race in the log domain (argmax of logits + T * Gumbel noise, the TTS's draws) lands on each
    token with the softmax probability at temperature 1 and 0.5 (the same bounds as sample's), draws
    only the k best with top-k, and the argmax at temperature 0. Made from the same noise as
    sample()'s race, it draws the same token (they differ only where two candidates tie to float
    rounding, which these logits never do)."""
    n = 20_000
    for temperature in (1.0, 0.5):
        p = torch.softmax(LOGITS / temperature, -1)
        drawn = _race(n, temperature=temperature)
        counts = torch.bincount(drawn, minlength=V).float()
        expected = n * p
        sigma = (n * p * (1 - p)).sqrt()
        assert bool(((counts - expected).abs() <= 5 * sigma + 1).all()), (counts, expected)
        assert float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum()) < 40.0
        assert torch.equal(drawn, _draw(n, temperature=temperature))
    assert set(_race(5000, top_k=3).tolist()) == {0, 7, 1}
    assert torch.equal(_race(5000, top_k=3), _draw(5000, top_k=3))
    assert set(_race(100, temperature=0.0).tolist()) == {0}
    assert set(_race(100, temperature=0.0, top_k=3).tolist()) == {0}


def test_the_uniform_noise_never_reaches_0_or_1(monkeypatch):
    """The noise's extreme hash values (all bits clear, all bits set) still give u strictly inside
    (0, 1) in float32, so no token's race weight p / E is infinite (E = -log u = 0) or its noise
    degenerate: with 24 bits the largest value rounded to exactly 1.0."""
    import duplex.engine.sampling as sampling

    keys = token_keys(4, "cpu")
    for bits in (0, 0xFFFFFFFF):
        monkeypatch.setattr(sampling, "_mix", lambda x, bits=bits: torch.full_like(x, bits))
        u = uniform(draw_key(torch.tensor([1]), torch.tensor([0])), keys)
        assert u.dtype == torch.float32
        assert 0.0 < float(u.min()) and float(u.max()) < 1.0, (bits, u)
        assert bool(torch.isfinite(torch.log(-torch.log(u))).all())
