"""Exact streaming Mimi codec: a stateful decoder (codes to audio) and encoder (audio to codes).

``MimiModel.decode`` in transformers keeps no state between calls except the decoder transformer's KV
cache, so decoding in chunks clicks at every join. Here every piece of state a causal Mimi carries
from one chunk to the next lives in a :class:`CodecState`:

- the causal convolutions' left context (the last ``(kernel - 1) * dilation + 1 - stride`` input
  samples of each :class:`MimiConv1d`),
- the overlap tails of the transposed convolutions (the last ``kernel - stride`` output samples of
  each :class:`MimiConvTranspose1d`, still to be summed with the next chunk's first outputs),
- the transformer's KV cache, a ring holding the last ``sliding_window - 1`` positions (the
  attention span of the one-shot model) and room for the next call's, with absolute RoPE positions.

So decoding frame by frame, or in chunks of any size, gives the samples of one-shot decoding (up to
float rounding). The weights are the Hugging Face modules' own; only the forward pass is streamed.
Codes are ``[B, K, T]`` (K codebooks, T frames at 12.5 Hz); each frame is ``frame_size`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch
    from transformers import MimiModel


@dataclass
class WindowKV:
    """Sliding-window KV cache of one streaming transformer: a ring per layer.

    A query at position ``a`` sees the keys of positions ``(a - window, a]``. Each layer keeps its keys
    and values side by side in a ring of ``window - 1 + steps`` columns, position ``q`` in column
    ``q mod ring``: a call of up to ``steps`` positions writes its keys and values in place, one kernel
    a layer, over columns whose positions no query needs any more, and attends over the whole ring
    under a mask made from the positions (once per call). Nothing is shifted, joined or copied back.
    ``valid`` and ``position`` are per row (``[B]`` long, on the codec's device; an int means every
    row), so rows of different streams, at different points of their audio, can be decoded in one
    batch. A row whose call is not kept (:mod:`duplex.tts.slot_codec`'s end frame) only keeps its
    ``valid`` and ``position``: its next call writes the same columns again.
    """

    kv: list[torch.Tensor]  # per layer [B, 2, H_kv, ring, D]: keys, values
    window: int  # positions a query sees, itself included
    valid: torch.Tensor | int = 0  # how many positions before ``position`` are real (at most window - 1)
    position: torch.Tensor | int = 0  # absolute position of the next input step

    @property
    def steps(self) -> int:
        """The most positions one call writes (a longer call runs in pieces of this many)."""
        return self.kv[0].shape[3] - (self.window - 1)

    def copy(self) -> WindowKV:
        import torch

        return WindowKV([t.clone() for t in self.kv], self.window, torch.as_tensor(self.valid).clone(),
                        torch.as_tensor(self.position).clone())


@dataclass
class CodecState:
    """Everything a streaming Mimi half carries between chunks (one per reply or live input)."""

    kv: WindowKV
    conv_context: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [B, C_in, pad]
    overlap: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [B, C_out, k - s]
    frames: int = 0  # frames decoded (decoder) or encoded (encoder) so far
    pending: torch.Tensor | None = None  # encoder only: input samples short of a whole frame [B, 1, n]
    # rows that decode their first frame while their contexts are already set (static rows, see
    # duplex.tts.slot_codec): with replicate padding their left context is their first input repeated
    fresh: torch.Tensor | None = None

    def copy(self) -> CodecState:
        return CodecState(self.kv.copy(), {k: v.clone() for k, v in self.conv_context.items()},
                          {k: v.clone() for k, v in self.overlap.items()}, self.frames,
                          None if self.pending is None else self.pending.clone())


# -- building blocks -------------------------------------------------------------------------------


def padding_total(conv) -> int:
    """A ``MimiConv1d``'s left context in samples, from its convolution's sizes (its own
    ``padding_total`` is a device tensor: reading it would wait for the GPU, at every chunk)."""
    inner = conv.conv
    return (inner.kernel_size[0] - 1) * inner.dilation[0] + 1 - inner.stride[0]


def _check_paddings(module) -> None:
    """Every causal convolution's ``padding_total`` is the one :func:`padding_total` computes (read
    once, at load)."""
    from transformers.models.mimi.modeling_mimi import MimiConv1d

    for name, conv in module.named_modules():
        if isinstance(conv, MimiConv1d) and int(conv.padding_total) != padding_total(conv):
            raise ValueError(f"Mimi convolution {name}: padding {int(conv.padding_total)} where its sizes give "
                             f"{padding_total(conv)}")


def conv_step(name: str, conv, x: torch.Tensor, state: CodecState) -> torch.Tensor:
    """One chunk through a causal ``MimiConv1d``: prepend the kept left context, keep the new one.

    ``x`` is ``[B, C, n * stride]``; the output is ``[B, C_out, n]``, the same frames one-shot gives.
    """
    import torch

    pad = padding_total(conv)
    context = state.conv_context.get(name)
    if context is None:  # first chunk: the one-shot left padding
        if conv.pad_mode == "replicate":
            context = x[..., :1].expand(-1, -1, pad)
        else:
            context = x.new_zeros(x.shape[0], x.shape[1], pad)
    elif state.fresh is not None and conv.pad_mode == "replicate":
        context = torch.where(state.fresh[:, None, None], x[..., :1].expand(-1, -1, pad), context)
    full = torch.cat([context, x], dim=-1)
    # a view of this chunk's input, which nothing writes to (no copy a step: the slot decoder copies
    # it into its own rows where the row commits)
    state.conv_context[name] = full[..., full.shape[-1] - pad:]
    return conv.conv(full)


def conv_transpose_step(name: str, convtr, x: torch.Tensor, state: CodecState) -> torch.Tensor:
    """One chunk through a causal ``MimiConvTranspose1d``: overlap-add the kept tail, keep the new one.

    ``x`` is ``[B, C, n]``; the output is ``[B, C_out, n * stride]``. One-shot trims ``kernel - stride``
    samples at the right of the whole output (``trim_right_ratio`` 1); streaming holds them back as the
    tail that the next chunk's first outputs add onto.
    """
    import torch

    conv = convtr.conv
    stride = conv.stride[0]
    y = torch.nn.functional.conv_transpose1d(x, conv.weight, None, stride=stride, groups=conv.groups)
    tail = state.overlap.get(name)
    if tail is not None:
        y = torch.cat([y[..., : tail.shape[-1]] + tail, y[..., tail.shape[-1]:]], dim=-1)
    keep = x.shape[-1] * stride
    state.overlap[name] = y[..., keep:]  # a view, as conv_step's context
    out = y[..., :keep]
    if conv.bias is not None:
        out = out + conv.bias[None, :, None]
    return out


def _new_window(transformer, batch: int, device, dtype, steps: int) -> WindowKV:
    import torch

    cfg = transformer.config
    window = max(int(cfg.sliding_window), 1)
    shape = (batch, 2, cfg.num_key_value_heads, window - 1 + steps, cfg.head_dim)
    return WindowKV([torch.zeros(shape, device=device, dtype=dtype) for _ in transformer.layers], window,
                    torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.long, device=device))


@dataclass
class MimiLayer:
    """One Mimi transformer layer's weights as :func:`transformer_step` runs it: q/k/v in one matrix
    (the module's own parameters become views of it), and each layer scale folded into the matrix
    before it (``s * (W a) = (s W) a``), so each residual add rides in that product's ``addmm``."""

    norm1: Any  # the module's LayerNorm
    qkv: torch.Tensor  # [(H + 2 H_kv) D, C]
    qkv_bias: torch.Tensor | None
    out: torch.Tensor  # o_proj's weight, scaled by the attention's layer scale
    out_bias: torch.Tensor | None
    norm2: Any
    fc1: torch.Tensor
    fc2: torch.Tensor  # scaled by the MLP's layer scale
    act: Any


def mimi_layers(transformer) -> list[MimiLayer]:
    """:class:`MimiLayer` weights of every layer of a ``MimiTransformerModel`` (made once, at load)."""
    import torch

    from duplex.engine.decoder import fuse_linears

    layers = []
    with torch.no_grad():
        for layer in transformer.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if mlp.fc1.bias is not None or mlp.fc2.bias is not None:
                raise ValueError("this Mimi's MLP has biases; the streaming codec supports the released "
                                 "Mimi's (none)")
            qkv, qkv_bias = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            s1, s2 = layer.self_attn_layer_scale.scale, layer.mlp_layer_scale.scale  # [C]
            layers.append(MimiLayer(
                norm1=layer.input_layernorm, qkv=qkv, qkv_bias=qkv_bias,
                out=(attn.o_proj.weight.float() * s1.float()[:, None]).to(qkv.dtype),
                out_bias=None if attn.o_proj.bias is None else (attn.o_proj.bias * s1).to(qkv.dtype),
                norm2=layer.post_attention_layernorm, fc1=mlp.fc1.weight,
                fc2=(mlp.fc2.weight.float() * s2.float()[:, None]).to(qkv.dtype), act=mlp.activation_fn))
    return layers


def transformer_step(transformer, layers: list[MimiLayer], x: torch.Tensor, kv: WindowKV) -> torch.Tensor:
    """``x`` ``[B, T, C]`` through a ``MimiTransformerModel`` (its :func:`mimi_layers` weights) with a
    sliding-window KV cache.

    Query ``i`` (absolute position ``p + i``) sees the keys at positions ``(p + i - window, p + i]``,
    as the one-shot sliding-window mask does. A layer is 12 kernels (Mimi's own forward, 29): q/k/v
    in one product, RoPE over queries and keys in one pass written back into it
    (:func:`duplex.engine.decoder.rope`), the new keys and values into the ring in one write, the
    layer scales in the output products, whose residual adds ride in their ``addmm``. The same numbers
    as Mimi's layers to float rounding. More than ``kv.steps`` positions run in pieces.
    """
    import torch
    import torch.nn.functional as F

    from duplex.engine.decoder import attention, attention_mask, residual_linear, rope, signed_sin

    x = x.contiguous()  # the residual stream, [B, T, C] in rows (the first addmm's input at every batch size)
    batch, steps, _ = x.shape
    if steps > kv.steps:
        return torch.cat([transformer_step(transformer, layers, x[:, i:i + kv.steps], kv)
                          for i in range(0, steps, kv.steps)], dim=1)
    device = x.device
    ring = kv.kv[0].shape[3]
    valid = torch.as_tensor(kv.valid, device=device).reshape(-1).expand(batch)  # [B]
    start = torch.as_tensor(kv.position, device=device).reshape(-1).expand(batch)  # [B]
    positions = start[:, None] + torch.arange(steps, device=device)  # [B, T]
    cos, sin = transformer.rotary_emb(x, positions)  # [B, T, D], rotate_half's layout
    cos, sin = cos[:, :, None], signed_sin(sin)[:, :, None]
    # the position each ring column holds once this call's are written, and who may see it (made
    # additive once here: a boolean mask is converted by every layer's attention)
    last = positions[:, -1:]
    held = (last - (last - torch.arange(ring, device=device)) % ring)[:, None, :]  # [B, 1, ring]
    seen = positions[:, :, None]  # [B, T, 1]
    sees = (held <= seen) & (held > seen - kv.window) & (held >= (start - valid)[:, None, None])  # [B, T, ring]
    attn = transformer.layers[0].self_attn
    heads, kv_heads, d = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    bias = attention_mask(sees, heads // kv_heads, x.dtype)
    columns = positions % ring  # [B, T]: where this call's keys and values go
    rows = torch.arange(batch, device=device)[:, None]

    for index, (module, layer) in enumerate(zip(transformer.layers, layers)):
        qkv = F.linear(layer.norm1(x), layer.qkv, layer.qkv_bias).view(batch, steps, -1, d)
        qk = qkv[:, :, :heads + kv_heads]
        rope(qk, cos, sin, out=qk)  # queries and keys rotated in place: keys and values side by side
        cache = kv.kv[index]
        cache[rows, :, :, columns] = qkv[:, :, heads:].unflatten(2, (2, kv_heads))  # [B, T, 2, H_kv, D]
        out = attention(qkv[:, :, :heads], cache[:, 0], cache[:, 1], bias, module.self_attn.scaling)
        x = residual_linear(x, out, layer.out, layer.out_bias)
        x = residual_linear(x, layer.act(F.linear(layer.norm2(x), layer.fc1)), layer.fc2, None)
    kv.valid = (valid + steps).clamp(max=kv.window - 1)
    kv.position = start + steps
    return x


def _seanet_step(prefix: str, seanet, x: torch.Tensor, state: CodecState) -> torch.Tensor:
    from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

    for index, layer in enumerate(seanet.layers):
        name = f"{prefix}.{index}"
        if isinstance(layer, MimiConv1d):
            x = conv_step(name, layer, x, state)
        elif isinstance(layer, MimiConvTranspose1d):
            x = conv_transpose_step(name, layer, x, state)
        elif isinstance(layer, MimiResnetBlock):
            residual = x
            for sub_index, sub in enumerate(layer.block):
                x = conv_step(f"{name}.{sub_index}", sub, x, state) if isinstance(sub, MimiConv1d) else sub(x)
            shortcut = layer.shortcut
            if isinstance(shortcut, MimiConv1d):
                residual = conv_step(f"{name}.shortcut", shortcut, residual, state)
            else:
                residual = shortcut(residual)
            x = residual + x
        else:  # activations
            x = layer(x)
    return x


def _check_causal(config) -> None:
    if not config.use_causal_conv:
        raise ValueError("streaming Mimi needs causal convolutions (use_causal_conv=True)")
    if config.trim_right_ratio != 1.0:
        raise ValueError("streaming Mimi needs trim_right_ratio=1.0 (all transposed-conv trimming on the right)")


def code_table(quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Mimi's quantizer decode as one lookup: ``(table, offsets)``, every codebook's entries through its
    group's output projection ``[K * V, C]``, and the first row of codebook ``k`` in it ``[K, 1]``.

    Mimi decodes codes ``[B, K, T]`` as, for each of its two groups (semantic, acoustic), the sum of
    the group's codebook entries, then the group's output projection (a 1x1 convolution), then the
    two groups' sum. All of it is linear, so it is the sum of each codebook's projected entry:
    ``embedding(codes + offsets, table).sum(1)``, three kernels a frame where Mimi's loop launches
    two per codebook and more (about 70 for CSM's 32 codebooks). Made in fp32, kept in the
    codec's dtype; equal to Mimi's decode to float rounding (``tests/test_tts_codec.py``)."""
    import torch

    tables, dtype = [], None
    for group in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
        project = None if group.output_proj is None else group.output_proj.weight[:, :, 0].float()  # [C, D]
        for layer in group.layers:
            entries = layer.codebook.embed  # [V, D]
            dtype = entries.dtype
            tables.append(entries.float() if project is None else entries.float() @ project.T)
    table = torch.cat(tables).to(dtype)
    size = tables[0].shape[0]
    offsets = torch.arange(len(tables), device=table.device)[:, None] * size
    return table, offsets


# -- decoder and encoder ---------------------------------------------------------------------------


class StreamingDecoder:
    """Decodes Mimi codes chunk by chunk, exactly as one-shot ``MimiModel.decode`` would."""

    def __init__(self, codec: MimiModel) -> None:
        decoder = codec.decoder
        if decoder is None:
            raise ValueError("this Mimi model has no decoder")
        _check_causal(codec.config)
        self.codec = codec
        self.decoder = decoder
        self.frame_size = int(codec.config.frame_size)
        self.num_codebooks = int(codec.config.num_quantizers)
        _check_paddings(decoder)
        import torch

        with torch.no_grad():
            self._table, self._offsets = code_table(codec.quantizer)
        self._layers = mimi_layers(decoder.decoder_transformer)
        # the transformer's positions per frame: the upsampling's stride (Mimi's: 12.5 Hz to 25 Hz)
        self.steps_per_frame = int(decoder.upsample.conv.stride[0]) if decoder.upsample is not None else 1

    def new_state(self, batch: int = 1, steps: int = 64) -> CodecState:
        """A stream's state before its first frame; its transformer takes up to ``steps`` positions a
        call in one piece (a frame is :attr:`steps_per_frame`)."""
        p = next(self.decoder.parameters())
        return CodecState(_new_window(self.decoder.decoder_transformer, batch, p.device, p.dtype, steps))

    def decode(self, codes: torch.Tensor, state: CodecState) -> torch.Tensor:
        """``codes`` ``[B, K, T]`` (the next T frames) -> audio ``[B, T * frame_size]``."""
        if codes.ndim != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [B, {self.num_codebooks}, T], got {tuple(codes.shape)}")
        import torch.nn.functional as F

        decoder = self.decoder
        latents = F.embedding(codes + self._offsets, self._table).sum(dim=1).transpose(1, 2)  # [B, C, T]
        p = next(decoder.parameters())
        latents = latents.to(p.dtype)
        x = conv_transpose_step("upsample", decoder.upsample, latents, state) if decoder.upsample is not None \
            else latents  # [B, C, 2T]
        x = transformer_step(decoder.decoder_transformer, self._layers, x.transpose(1, 2), state.kv).transpose(1, 2)
        audio = _seanet_step("seanet", decoder.decoder_seanet, x, state)  # [B, 1, T * frame_size]
        state.frames += codes.shape[-1]
        return audio[:, 0]


class StreamingEncoder:
    """Encodes audio to Mimi codes as it arrives (a voice prompt, or a live voice).

    Samples are consumed in whole frames; the remainder waits in the state for the next call. Fed
    whole frames, the codes equal those of one-shot ``MimiModel.encode`` on the same samples.
    """

    def __init__(self, codec: MimiModel) -> None:
        encoder = codec.encoder
        if encoder is None:
            raise ValueError("this Mimi model has no encoder")
        _check_causal(codec.config)
        self.codec = codec
        self._encoder = encoder
        self.frame_size = int(codec.config.frame_size)
        self.num_codebooks = int(codec.config.num_quantizers)
        _check_paddings(encoder)
        self._layers = mimi_layers(encoder.encoder_transformer)

    def new_state(self, batch: int = 1, steps: int = 64) -> CodecState:
        p = next(self._encoder.parameters())
        return CodecState(_new_window(self._encoder.encoder_transformer, batch, p.device, p.dtype, steps))

    def latents(self, audio: torch.Tensor, state: CodecState) -> torch.Tensor:
        """``audio`` ``[B, n]`` -> continuous latents ``[B, C, frames]`` of the whole frames now complete."""
        import torch

        if audio.ndim != 2:
            raise ValueError(f"audio must be [B, samples], got {tuple(audio.shape)}")
        encoder = self._encoder
        p = next(encoder.parameters())
        x = audio[:, None].to(device=p.device, dtype=p.dtype)
        if state.pending is not None:
            x = torch.cat([state.pending, x], dim=-1)
        whole = (x.shape[-1] // self.frame_size) * self.frame_size
        state.pending = x[..., whole:].clone()
        x = x[..., :whole]
        if whole == 0:
            return x.new_zeros(x.shape[0], self.codec.config.hidden_size, 0)
        x = _seanet_step("seanet", encoder.encoder_seanet, x, state)
        x = transformer_step(encoder.encoder_transformer, self._layers, x.transpose(1, 2), state.kv).transpose(1, 2)
        if encoder.downsample is not None:
            x = conv_step("downsample", encoder.downsample, x, state)
        state.frames += x.shape[-1]
        return x

    def encode(self, audio: torch.Tensor, state: CodecState) -> torch.Tensor:
        """``audio`` ``[B, n]`` -> codes ``[B, K, frames]`` of the whole frames now complete."""
        latents = self.latents(audio, state)
        if latents.shape[-1] == 0:
            return latents.new_zeros(latents.shape[0], self.num_codebooks, 0).long()
        return self.codec.quantizer.encode(latents, self.num_codebooks).transpose(0, 1)
