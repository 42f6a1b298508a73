"""The ASR's folded conformer layer and plain subsampling against NeMo's own modules.

:mod:`duplex.asr.conformer_layer` folds NeMo's weights at load (the query's position biases and
scale, the feed-forward factor, an inference BatchNorm) and writes the relative shift as a strided
view; :func:`duplex.asr.encoder.pre_encode` runs the subsampling's convolutions without NeMo's
all-ones length masks. These tests hold each to NeMo's module on the same inputs, layer by layer,
for both convolution norms a FastConformer has (the tiny model's LayerNorm, and BatchNorm with
running statistics), so a fold that is wrong for one of them shows here and not only end to end.
"""

from __future__ import annotations

import copy

import pytest
import torch

from asr_fixtures import tiny_nemo  # noqa: F401


def _batch_norm_layer(layer):
    """A copy of NeMo ``ConformerLayer`` ``layer`` whose convolution module has an inference
    BatchNorm with non-trivial statistics and affine weights in place of its LayerNorm."""
    layer = copy.deepcopy(layer)
    channels = layer.conv.depthwise_conv.out_channels
    bn = torch.nn.BatchNorm1d(channels)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator) * 0.3)
        bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=generator) * 0.2)
    layer.conv.batch_norm, layer.conv.norm_type = bn.eval(), "batch_norm"
    return layer.eval()


@pytest.mark.parametrize("norm", ["layer_norm", "batch_norm"])
@pytest.mark.parametrize("frames", [1, 3])
def test_the_folded_layer_equals_nemo_conformer_layer(tiny_nemo, norm, frames):
    """One streaming step of :func:`conformer_step` on a batch whose rows hold caches of different
    lengths gives NeMo's ``ConformerLayer.forward`` output and its next attention and convolution
    caches to 1e-5 (the caches as the folded step keeps them: keys and values projected)."""
    from duplex.asr import conformer_layer

    encoder = tiny_nemo.encoder
    layer = encoder.layers[0] if norm == "layer_norm" else _batch_norm_layer(encoder.layers[0])
    assert layer.conv.norm_type == norm
    attn = layer.self_attn
    batch, left, d_model = 3, 7, encoder.d_model
    kernel = layer.conv.depthwise_conv.kernel_size[0]
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(batch, frames, d_model, generator=generator)
    channel = torch.randn(batch, left, d_model, generator=generator)  # NeMo's cache: normed attention inputs
    time = torch.randn(batch, d_model, kernel - 1, generator=generator)
    with torch.no_grad():
        x, pos_emb = encoder.pos_enc(x=x, cache_len=left)
        window = left + frames
        masked = torch.zeros(batch, frames, window, dtype=torch.bool)
        for b, real in enumerate((left, 3, 0)):  # the cache's real frames, then causal within the chunk
            masked[b, :, :left - real] = True
            for i in range(frames):
                masked[b, i, left + i + 1:] = True
        pad_mask = torch.zeros(batch, frames, dtype=torch.bool)
        want, want_channel, want_time = layer(x, att_mask=masked, pos_emb=pos_emb, pad_mask=pad_mask,
                                              cache_last_channel=channel, cache_last_time=time)

        weights = conformer_layer.fold(layer)
        cached = torch.cat([attn.linear_k(channel), attn.linear_v(channel)], dim=-1)  # [B, left, 2 D]
        room = torch.full((batch, frames, 2 * d_model), 7.0)  # what the step must overwrite with the chunk's
        kv = torch.cat([cached, room], dim=1)
        positions = attn.linear_pos(pos_emb)[0].view(-1, attn.h, attn.d_k).transpose(0, 1).contiguous()
        mask = (masked.float() * -10000.0).unsqueeze(1)
        got, conv_window = conformer_layer.conformer_step(x, weights, kv, time, positions, mask)

    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    want_kv = torch.cat([attn.linear_k(want_channel), attn.linear_v(want_channel)], dim=-1)
    assert (kv[:, -left:] - want_kv).abs().max().item() < 1e-5
    assert (conv_window[:, :, -(kernel - 1):] - want_time).abs().max().item() < 1e-5  # a product, not a conv: rounding


def test_a_layer_the_fold_cannot_reproduce_is_refused(tiny_nemo):
    """A convolution module with another norm is named as the reason, and ``fold`` refuses it rather
    than run different arithmetic."""
    from duplex.asr import conformer_layer

    layer = copy.deepcopy(tiny_nemo.encoder.layers[0])
    layer.conv.norm_type = "instance_norm"
    assert "instance_norm" in conformer_layer.supported(layer)
    with pytest.raises(ValueError, match="instance_norm"):
        conformer_layer.fold(layer)


@pytest.mark.parametrize("first", [True, False])
def test_plain_subsampling_equals_nemo_pre_encode(tiny_nemo, first):
    """The subsampling without NeMo's length masks gives exactly NeMo's ``pre_encode`` on whole
    rows, for a first chunk and a later one (pre-encode cache included, first frames dropped)."""
    from duplex.asr.encoder import pre_encode, select_context

    encoder = tiny_nemo.encoder
    plan = select_context(tiny_nemo, (70, 1))
    mel_frames = plan.first_mel if first else plan.pre_cache + plan.mel
    mel = torch.randn(4, tiny_nemo.preprocessor.featurizer.nfilt, mel_frames, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = pre_encode(encoder, plan, mel, first=first)
        lengths = torch.full((4,), mel_frames, dtype=torch.int64)
        want, _ = encoder.pre_encode(x=mel.transpose(1, 2), lengths=lengths)
    want = want if first else want[:, plan.drop:]
    assert got.shape == want.shape and got.shape[1] >= 1
    assert torch.equal(got, want)
