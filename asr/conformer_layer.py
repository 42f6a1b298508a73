"""One cache-aware FastConformer layer in few kernels: NeMo's weights, folded at load.

NeMo's ``ConformerLayer`` launches about 46 kernels a streaming step (tiny model, CPU eager): three
query/key/value products, the two position biases added to the query one at a time, a scores
division, a softmax between two ``masked_fill``s, a padding copy for the relative shift, a
``masked_fill`` of padding the steady step never has, and a scale multiply after each feed-forward.
:class:`ConformerWeights` folds what is constant at load into the weights, so the same arithmetic
runs in 28:

- one product makes ``[q + u, q + v, k, v]`` (NeMo's ``pos_bias_u``/``pos_bias_v`` in its bias, the
  ``1/sqrt(d_k)`` scale in the query rows: a power of two for d_k 16 or 64, so exact);
- the position term ``(q + v) . p`` is one batched product over the window's projected positions;
  its relative shift (Transformer-XL's pad-and-reshape) is a strided view, no copy;
- the content term, the softmax and the values are one ``scaled_dot_product_attention`` whose
  additive mask is the position term plus the chunk's attention mask (masked entries at NeMo's
  ``-INF_VAL``: their weights are exactly 0 in both);
- the feed-forwards' ``fc_factor`` (0.5) is in their second product's weights (exact);
- an inference BatchNorm after the depth-wise convolution is folded into that convolution.

The layer's keys and values sit side by side (``[..., 2 * d_model]``) in a window with room for the
chunk's, so a step writes both in one small copy, where joining them to the cache copied it whole.
:func:`conformer_step` is the layer's streaming forward; ``tests/test_asr_conformer_layer.py`` holds
it to NeMo's ``ConformerLayer`` to 1e-5, and ``tests/test_asr_streaming.py`` the whole stream to
NeMo's streaming step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Norm:
    """A LayerNorm's parameters."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


@dataclass(frozen=True)
class ConformerWeights:
    """One layer's weights as :func:`conformer_step` runs them (see the module docstring)."""

    ff1: tuple[Norm, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # norm, w1, b1, w2 * fc, b2 * fc
    attn_norm: Norm
    qkv: tuple[torch.Tensor, torch.Tensor]  # [4 D, D], [4 D]: rows q+u (scaled), q+v (scaled), k, v
    out: tuple[torch.Tensor, torch.Tensor]
    heads: int
    conv_norm: Norm
    pointwise1: tuple[torch.Tensor, torch.Tensor]  # [2 D, D], [2 D]: a Linear's (the convolution's kernel is 1)
    depthwise: tuple[torch.Tensor, torch.Tensor]  # [D, 1, K], [D] (an inference BatchNorm folded in)
    depthwise_norm: Norm | None  # the LayerNorm after the depth-wise convolution, if the model has one
    pointwise2: tuple[torch.Tensor, torch.Tensor]  # [D, D], [D]
    ff2: tuple[Norm, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    out_norm: Norm


def supported(layer) -> str | None:
    """Why :class:`ConformerWeights` cannot reproduce this NeMo ``ConformerLayer`` exactly, or None."""
    import torch

    conv = layer.conv
    if conv.pointwise_activation != "glu_":
        return f"its convolution module's pointwise activation is {conv.pointwise_activation!r}, not GLU"
    if conv.norm_type not in ("batch_norm", "layer_norm"):
        return f"its convolution module's norm is {conv.norm_type!r}"
    depthwise = conv.depthwise_conv
    if getattr(depthwise, "_right_padding", 0) != 0 or getattr(depthwise, "cache_drop_size", 0) not in (0, None):
        return "its depth-wise convolution looks ahead or drops cache"
    if depthwise.stride != (1,) or depthwise.dilation != (1,) or depthwise.groups != depthwise.in_channels:
        return "its depth-wise convolution is strided, dilated or not depth-wise"
    for ff in (layer.feed_forward1, layer.feed_forward2):
        if type(ff.activation).__name__ != "Swish" and not isinstance(ff.activation, torch.nn.SiLU):
            return f"a feed-forward's activation is {type(ff.activation).__name__}"
    if conv.use_bias is False or layer.self_attn.linear_q.bias is None:
        return "it has no biases"  # the folds below assume NeMo's default biases
    return None


def _norm(module) -> Norm:
    return Norm(module.weight, module.bias, module.eps)


def _feed_forward(norm, ff, factor: float, dtype) -> tuple[Norm, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w2 = (ff.linear2.weight.float() * factor).to(dtype)
    b2 = (ff.linear2.bias.float() * factor).to(dtype)
    return _norm(norm), ff.linear1.weight, ff.linear1.bias, w2, b2


def fold(layer) -> ConformerWeights:
    """The weights of NeMo ``ConformerLayer`` ``layer`` (in eval mode, on its device and dtype), folded
    once (in float32, rounded once to the layer's dtype)."""
    import torch

    reason = supported(layer)
    if reason is not None:
        raise ValueError(f"this conformer layer cannot take the folded step: {reason}")
    attn, conv = layer.self_attn, layer.conv
    dtype = attn.linear_q.weight.dtype
    with torch.no_grad():
        scale = 1.0 / attn.s_d_k
        wq, bq = attn.linear_q.weight.float(), attn.linear_q.bias.float()
        u, v = attn.pos_bias_u.float().reshape(-1), attn.pos_bias_v.float().reshape(-1)
        weight = torch.cat([wq * scale, wq * scale, attn.linear_k.weight.float(), attn.linear_v.weight.float()])
        bias = torch.cat([(bq + u) * scale, (bq + v) * scale, attn.linear_k.bias.float(), attn.linear_v.bias.float()])
        dw_w, dw_b = conv.depthwise_conv.weight.float(), conv.depthwise_conv.bias.float()
        depthwise_norm = None
        if conv.norm_type == "batch_norm":
            bn = conv.batch_norm
            gain = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
            dw_w = dw_w * gain[:, None, None]
            dw_b = (dw_b - bn.running_mean.float()) * gain + bn.bias.float()
        else:
            depthwise_norm = _norm(conv.batch_norm)
        return ConformerWeights(
            ff1=_feed_forward(layer.norm_feed_forward1, layer.feed_forward1, layer.fc_factor, dtype),
            attn_norm=_norm(layer.norm_self_att),
            qkv=(weight.to(dtype), bias.to(dtype)),
            out=(attn.linear_out.weight, attn.linear_out.bias),
            heads=attn.h,
            conv_norm=_norm(layer.norm_conv),
            pointwise1=(conv.pointwise_conv1.weight[:, :, 0], conv.pointwise_conv1.bias),
            depthwise=(dw_w.to(dtype), dw_b.to(dtype)),
            depthwise_norm=depthwise_norm,
            pointwise2=(conv.pointwise_conv2.weight[:, :, 0], conv.pointwise_conv2.bias),
            ff2=_feed_forward(layer.norm_feed_forward2, layer.feed_forward2, layer.fc_factor, dtype),
            out_norm=_norm(layer.norm_out),
        )


def _layer_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    import torch.nn.functional as F

    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _feed_forward_step(x: torch.Tensor, ff) -> torch.Tensor:
    """``x + fc_factor * FF(norm(x))``: five kernels."""
    import torch.nn.functional as F

    norm, w1, b1, w2, b2 = ff
    return x + F.linear(F.silu(F.linear(_layer_norm(x, norm), w1, b1)), w2, b2)


def conformer_step(x: torch.Tensor, w: ConformerWeights, kv_window: torch.Tensor, time_cache: torch.Tensor,
                   positions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's streaming forward.

    ``x`` [B, T, D] (the chunk's frames); ``kv_window`` [B, left + T, 2 D]: the last ``left`` frames'
    keys and values, then T columns this step writes the chunk's into (its last ``left`` columns are
    then the next cache); ``time_cache`` [B, D, K - 1] (the convolution's); ``positions`` [H, P, d_k]
    (the window's projected relative positions, P = 2 (left + T) - 1); ``mask`` [B, 1, T, left + T]
    (additive: 0 or NeMo's ``-INF_VAL``). Returns the layer's output [B, T, D] and the convolution's
    window [B, D, K - 1 + T] (its last ``K - 1`` columns are the next convolution cache). Nothing of
    the caches' own rows is written here.
    """
    import torch
    import torch.nn.functional as F

    batch, frames, d_model = x.shape
    heads, d_k = w.heads, d_model // w.heads
    window = kv_window.shape[1]
    residual = _feed_forward_step(x, w.ff1)

    # attention: [q + u, q + v, k, v] in one product; the new keys and values go into the window
    qkv = F.linear(_layer_norm(residual, w.attn_norm), *w.qkv)  # [B, T, 4 D]
    kv_window[:, window - frames:] = qkv[..., 2 * d_model:]
    keys = kv_window[..., :d_model].unflatten(-1, (heads, d_k)).transpose(1, 2)  # [B, H, L, d_k]
    values = kv_window[..., d_model:].unflatten(-1, (heads, d_k)).transpose(1, 2)
    q_u = qkv[..., :d_model].unflatten(-1, (heads, d_k)).transpose(1, 2)  # [B, H, T, d_k]
    q_v = qkv[..., d_model:2 * d_model].unflatten(-1, (heads, d_k)).permute(2, 0, 1, 3)  # [H, B, T, d_k]
    bd = torch.bmm(q_v.reshape(heads, batch * frames, d_k), positions.transpose(1, 2))  # [H, B T, P]
    span = bd.shape[-1]
    # the relative shift: query i's window column j is position column j + T - 1 - i
    shifted = bd.as_strided((heads, batch, frames, window), (batch * frames * span, frames * span, span - 1, 1),
                            bd.storage_offset() + frames - 1)
    scores_bias = shifted.permute(1, 0, 2, 3) + mask  # [B, H, T, L]
    att = F.scaled_dot_product_attention(q_u, keys, values, attn_mask=scores_bias, scale=1.0)
    att = att.transpose(1, 2).reshape(batch, frames, d_model)
    residual = residual + F.linear(att, *w.out)

    # convolution module: pointwise (GLU), causal depth-wise over the cached columns, norm, swish, pointwise
    h = F.glu(F.linear(_layer_norm(residual, w.conv_norm), *w.pointwise1), dim=-1)  # [B, T, D]
    conv_window = torch.cat([time_cache, h.transpose(1, 2)], dim=2)  # [B, D, K - 1 + T]
    h = F.conv1d(conv_window, *w.depthwise, groups=d_model)  # [B, D, T]
    if w.depthwise_norm is not None:
        h = F.linear(F.silu(_layer_norm(h.transpose(1, 2), w.depthwise_norm)), *w.pointwise2)
    else:
        h = F.conv1d(F.silu(h), w.pointwise2[0][:, :, None], w.pointwise2[1]).transpose(1, 2)
    residual = residual + h

    residual = _feed_forward_step(residual, w.ff2)
    return _layer_norm(residual, w.out_norm), conv_window
