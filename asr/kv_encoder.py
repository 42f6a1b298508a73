"""A faster cache-aware conformer step: attention keys and values cached, positions projected once.

NeMo's streaming step caches each layer's attention *input* (the last ``left`` frames) and, every
chunk, projects the whole window again: keys and values for ``left + T`` frames and the relative
position embeddings for ``2 (left + T) - 1`` positions, in all 17 layers, to produce ``T`` new
frames. At small chunks that is nearly all of the work. Projections are per frame and the position
embeddings depend only on the window's length, so this step caches the projected keys and values
instead and projects the positions once per chunk length: the same arithmetic on the same values,
a fraction of the multiply-adds. Everything else (feed-forward, convolution module with its cache,
norms, masks, position table) is NeMo's own modules and functions, called as its layer does.

Used for rel-pos attention without adapters (every cache-aware FastConformer we know); other
encoders take NeMo's path (:func:`duplex.asr.encoder.encode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from duplex.asr.decoding import Commit
from duplex.asr.encoder import ChunkPlan

if TYPE_CHECKING:
    import torch


def supported(encoder) -> bool:
    """Whether every layer of ``encoder`` is one this step reproduces exactly."""
    from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention

    if encoder.self_attention_model != "rel_pos" or getattr(encoder, "out_proj", None) is not None:
        return False
    for layer in encoder.layers:
        if type(layer.self_attn) is not RelPositionMultiHeadAttention or layer.is_adapter_available():
            return False
        if layer.self_attn.cache_drop_size not in (0, None):
            return False
    return not encoder.is_adapter_available() if hasattr(encoder, "is_adapter_available") else True


class KVCachePool:
    """Per-session caches of the fast step, one slot each, allocated up front and grown by doubling.

    ``k`` / ``v`` [layers, slots, left, d_model]: projected keys and values of the last ``left``
    frames; ``time`` [layers, slots, d_model, kernel - 1]: the convolution cache (as NeMo's);
    ``length`` [slots]: how many of the ``left`` frames are real (the rest are masked).
    """

    def __init__(self, encoder, plan: ChunkPlan, capacity: int, device: str, dtype: torch.dtype) -> None:
        self.shape = (len(encoder.layers), plan.cache_channel, encoder.d_model, plan.cache_time)
        self.device, self.dtype = device, dtype
        self.capacity = 0
        self.k: torch.Tensor  # the four are allocated (and regrown) by grow()
        self.v: torch.Tensor
        self.time: torch.Tensor
        self.length: torch.Tensor
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        import torch

        if capacity <= self.capacity:
            return
        capacity, old = max(capacity, 2 * self.capacity), self.capacity
        layers, left, d_model, kernel = self.shape
        k = torch.zeros(layers, capacity, left, d_model, device=self.device, dtype=self.dtype)
        v = torch.zeros_like(k)
        time = torch.zeros(layers, capacity, d_model, kernel, device=self.device, dtype=self.dtype)
        length = torch.zeros(capacity, device=self.device, dtype=torch.int64)
        if old:
            k[:, :old], v[:, :old], time[:, :old], length[:old] = self.k, self.v, self.time, self.length
        self.k, self.v, self.time, self.length, self.capacity = k, v, time, length, capacity

    def reset(self, slots: torch.Tensor) -> None:
        self.k[:, slots] = 0
        self.v[:, slots] = 0
        self.time[:, slots] = 0
        self.length[slots] = 0


class KVEncoder:
    """The conformer layers of one encoder, stepped with :class:`KVCachePool` caches."""

    def __init__(self, encoder, plan: ChunkPlan, capacity: int, device: str, dtype: torch.dtype) -> None:
        self.encoder = encoder
        self.plan = plan
        self.pool = KVCachePool(encoder, plan, capacity, device, dtype)
        self._positions: dict[int, list[torch.Tensor]] = {}  # chunk length -> per-layer projected positions

    def _projected_positions(self, pos_emb: torch.Tensor, frames: int) -> list[torch.Tensor]:
        """``linear_pos`` of the position table for a window of ``left + frames``, per layer, as
        [1, heads, positions, d_k] (the same for every chunk of that length)."""
        cached = self._positions.get(frames)
        if cached is None or cached[0].dtype != pos_emb.dtype:
            cached = []
            for layer in self.encoder.layers:
                attn = layer.self_attn
                p = attn.linear_pos(pos_emb).view(1, -1, attn.h, attn.d_k).transpose(1, 2)
                cached.append(p)
            self._positions[frames] = cached
        return cached

    def prepare(self, x: torch.Tensor) -> None:
        """Project the position table for chunks as long as ``x`` [B, T, d_model] now, at load: a
        captured step must find it made (made inside a bucket's capture, it would be that graph's
        work and memory, and the other buckets' calls would differ from their captures)."""
        _, pos_emb = self.encoder.pos_enc(x=x, cache_len=self.plan.cache_channel)
        self._projected_positions(pos_emb, x.shape[1])

    def encode(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, Commit]:
        """Pre-encoded frames ``x`` [B, T, d_model] of the sessions in ``slots`` to encoder output
        [B, d_model, T], and the call that advances their caches by the chunk (nothing is written
        before it)."""
        import torch

        enc, pool, left = self.encoder, self.pool, self.plan.cache_channel
        batch, frames, _ = x.shape
        length = pool.length.index_select(0, slots)  # [B]
        x, pos_emb = enc.pos_enc(x=x, cache_len=left)  # xscale; positions for left + T
        n = torch.full((batch,), frames + left, dtype=torch.int64, device=x.device)
        pad_mask, att_mask = enc._create_masks(att_context_size=enc.att_context_size, padding_length=n,
                                               max_audio_length=frames + left, offset=left - length,
                                               device=x.device)
        pad_mask, att_mask = pad_mask[:, left:], att_mask[:, left:]  # [B, T], [B, T, left + T]
        positions = self._projected_positions(pos_emb, frames)
        new_k, new_v, new_time = [], [], []
        for i, layer in enumerate(enc.layers):
            k_cache = pool.k[i].index_select(0, slots)  # [B, left, D]
            v_cache = pool.v[i].index_select(0, slots)
            time_cache = pool.time[i].index_select(0, slots)  # [B, D, K]
            residual = x + layer.feed_forward1(layer.norm_feed_forward1(x)) * layer.fc_factor
            h = layer.norm_self_att(residual)
            att, k_all, v_all = _attention(layer.self_attn, h, k_cache, v_cache, positions[i], att_mask)
            residual = residual + att
            h = layer.norm_conv(residual)
            h, time_cache = layer.conv(h, pad_mask=pad_mask, cache=time_cache)
            residual = residual + h
            residual = residual + layer.feed_forward2(layer.norm_feed_forward2(residual)) * layer.fc_factor
            x = layer.norm_out(residual)
            new_k.append(k_all[:, -left:])
            new_v.append(v_all[:, -left:])
            new_time.append(time_cache)

        # everything the commit writes is made here: the commit itself only copies (it cannot run
        # out of memory half-way and leave one cache advanced and another not)
        k_rows, v_rows, time_rows = torch.stack(new_k), torch.stack(new_v), torch.stack(new_time)
        length_rows = torch.clamp(length + frames, max=left)

        def apply() -> None:
            pool.k.index_copy_(1, slots, k_rows)
            pool.v.index_copy_(1, slots, v_rows)
            pool.time.index_copy_(1, slots, time_rows)
            pool.length.index_copy_(0, slots, length_rows)

        return x.transpose(1, 2), apply


def _attention(attn, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: torch.Tensor,
               mask: torch.Tensor):
    """NeMo's ``RelPositionMultiHeadAttention.forward`` with the cached frames already projected.

    ``h`` [B, T, D] (normed layer input), caches [B, left, D], ``p`` [1, H, P, d_k] projected
    positions, ``mask`` [B, T, left + T] (True: masked). Returns the output [B, T, D] and the keys
    and values of the whole window [B, left + T, D].
    """
    import torch
    from nemo.collections.asr.parts.submodules.multi_head_attention import INF_VAL

    batch, frames, _ = h.shape
    k_all = torch.cat([k_cache, attn.linear_k(h)], dim=1)
    v_all = torch.cat([v_cache, attn.linear_v(h)], dim=1)
    q = attn.linear_q(h).view(batch, frames, attn.h, attn.d_k)  # (batch, time1, head, d_k)
    k = k_all.view(batch, -1, attn.h, attn.d_k).transpose(1, 2)  # (batch, head, time2, d_k)
    v = v_all.view(batch, -1, attn.h, attn.d_k).transpose(1, 2)
    q_u = (q + attn.pos_bias_u).transpose(1, 2)
    q_v = (q + attn.pos_bias_v).transpose(1, 2)
    matrix_bd = attn.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))
    matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))
    scores = (matrix_ac + matrix_bd[:, :, :, : matrix_ac.size(-1)]) / attn.s_d_k
    mask = mask.unsqueeze(1)
    weights = torch.softmax(scores.masked_fill(mask, -INF_VAL), dim=-1).masked_fill(mask, 0.0)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, frames, attn.h * attn.d_k)
    return attn.linear_out(out), k_all, v_all
