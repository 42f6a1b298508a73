"""The lean decoder's RoPE folded into the weights (``LeanDecoder.at_position``): the TTS's depth
steps, where every row sits at the same position, run no rotation, and say what the plain layers say."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from duplex.engine.decoder import LeanDecoder
from duplex.errors import ConfigError
from llm_fixtures import ARCHS, single_torch_thread, tiny_checkpoints  # noqa: F401


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_at_a_position_equal_the_plain_layers_there(arch, tiny_checkpoints):
    """Rows that all sit at position p (here after histories of different lengths written by plain
    prefills) get the same hidden states and write the same K/V through ``at_position(p)``'s layers
    (p's rotation in their qkv weights and, for Qwen2, the bias) as through the plain layers that
    rotate queries and keys by the table: equal to float rounding, in fp32. The folded step runs
    no RoPE: its three kernels fewer a layer (and the tables' two gathers fewer a step), counted."""
    from duplex.engine.opcount import count_ops

    model, _ = tiny_checkpoints[arch]
    decoder = LeanDecoder(model.model, model.config, positions=31)
    kv = decoder.new_kv(slots=3)
    g = torch.Generator().manual_seed(1)
    p = 9
    with torch.no_grad():  # as the engines' steps run (and the kernel budget counts them)
        for row, n in ((0, 9), (1, 4), (2, 7)):  # each row's history (position p is written by the step)
            decoder.prefill(torch.randn(n, decoder.hidden, generator=g), kv, row, 0)
        x = torch.randn(3, 1, decoder.hidden, generator=g)
        rows = torch.arange(3)
        positions = torch.full((3, 1), p)
        mask = decoder.key_index(p + 1)[None, None, :] <= positions[:, :, None]
        folded_layers = decoder.at_position(p)

        def run(layers):
            out = decoder.forward(x, positions, kv, slice(0, 3), rows, p + 1, mask, layers=layers)
            return out, [t[:3, :, p].clone() for t in (*kv.keys, *kv.values)]

        plain, plain_kv = run(None)
        folded, folded_kv = run(folded_layers)
        ops_plain = sum(count_ops(lambda: run(None)).values())
        ops_folded = sum(count_ops(lambda: run(folded_layers)).values())
    scale = float(plain.abs().max())
    assert float((folded - plain).abs().max()) <= 1e-5 * scale
    for a, b in zip(folded_kv, plain_kv):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))
    assert all(layer.rotated for layer in folded_layers) and not any(layer.rotated for layer in decoder.layers)
    # RoPE: x * cos, the halves swapped, their product added (rope()); the plain step also gathers
    # the tables' rows
    assert ops_plain - ops_folded == 3 * len(decoder.layers) + 2, (ops_plain, ops_folded)


def test_layers_with_query_and_key_norms_cannot_be_folded(tiny_checkpoints):
    """Qwen3's query and key norms come between the product and the rotation, so its RoPE cannot go
    into the weights: asking says so instead of giving wrong layers; a position outside the tables
    is refused too."""
    model, _ = tiny_checkpoints["qwen2"]
    decoder = LeanDecoder(model.model, model.config, positions=15)
    with pytest.raises(ValueError, match="outside"):
        decoder.at_position(17)
    ones = torch.ones(decoder.head_dim)
    decoder.layers = [dataclasses.replace(layer, q_norm=ones, k_norm=ones) for layer in decoder.layers]
    with pytest.raises(ConfigError, match="cannot be folded"):
        decoder.at_position(3)
