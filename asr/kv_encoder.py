"""A faster cache-aware conformer step: attention keys and values cached, positions projected once.

NeMo's streaming step caches each layer's attention *input* (the last ``left`` frames) and, every
chunk, projects the whole window again: keys and values for ``left + T`` frames and the relative
position embeddings for ``2 (left + T) - 1`` positions, in all 17 layers, to produce ``T`` new
frames. At small chunks that is nearly all of the work. Projections are per frame and the position
embeddings depend only on the window's length, so this step caches the projected keys and values
instead and projects the positions once per chunk length: the same arithmetic on the same values,
a fraction of the multiply-adds. Each layer runs NeMo's weights folded into few kernels
(:mod:`duplex.asr.conformer_layer`); the position table is NeMo's, and its attention mask is made
once per chunk length for every cache length and gathered per row.

Used for rel-pos attention without adapters (every cache-aware FastConformer we know); other
encoders take NeMo's path (:func:`duplex.asr.encoder.encode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from duplex.asr import conformer_layer
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
        if layer.self_attn.cache_drop_size not in (0, None) or conformer_layer.supported(layer) is not None:
            return False
    return not encoder.is_adapter_available() if hasattr(encoder, "is_adapter_available") else True


class KVCachePool:
    """Per-session caches of the fast step, one slot each, allocated up front and grown by doubling.

    ``kv`` [slots, layers, left + room, 2 d_model]: projected keys and values of the last ``left``
    frames, side by side, then ``room`` columns a chunk's new frames are written into (in the step's
    gathered copy: the window attention reads is that copy, joined by no ``cat``); ``time`` [layers,
    slots, d_model, kernel - 1]: the convolution cache (as NeMo's); ``length`` [slots]: how many of
    the ``left`` frames are real (the rest are masked).
    """

    def __init__(self, encoder, plan: ChunkPlan, capacity: int, device: str, dtype: torch.dtype) -> None:
        self.shape = (len(encoder.layers), plan.cache_channel, encoder.d_model, plan.cache_time)
        # a chunk's frames (a flush's provisional frames are at most about as many), with margin
        self.room = 2 * plan.out + 1
        self.device, self.dtype = device, dtype
        self.capacity = 0
        self.kv: torch.Tensor  # the three are allocated (and regrown) by grow()
        self.time: torch.Tensor
        self.length: torch.Tensor
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        import torch

        if capacity <= self.capacity:
            return
        capacity, old = max(capacity, 2 * self.capacity), self.capacity
        layers, left, d_model, kernel = self.shape
        # slots first: a step gathers its rows' attention caches as whole blocks
        kv = torch.zeros(capacity, layers, left + self.room, 2 * d_model, device=self.device, dtype=self.dtype)
        time = torch.zeros(layers, capacity, d_model, kernel, device=self.device, dtype=self.dtype)
        length = torch.zeros(capacity, device=self.device, dtype=torch.int64)
        if old:
            kv[:old], time[:, :old], length[:old] = self.kv, self.time, self.length
        self.kv, self.time, self.length, self.capacity = kv, time, length, capacity

    def reset(self, slots: torch.Tensor) -> None:
        self.kv[slots] = 0
        self.time[:, slots] = 0
        self.length[slots] = 0


class KVEncoder:
    """The conformer layers of one encoder, stepped with :class:`KVCachePool` caches, each layer in
    the folded form of :mod:`duplex.asr.conformer_layer`."""

    def __init__(self, encoder, plan: ChunkPlan, capacity: int, device: str, dtype: torch.dtype) -> None:
        self.encoder = encoder
        self.plan = plan
        self.pool = KVCachePool(encoder, plan, capacity, device, dtype)
        self.weights = [conformer_layer.fold(layer) for layer in encoder.layers]
        # chunk length -> per-layer projected positions [H, P, d_k], and the additive attention mask
        # of every cache length [left + 1, 1, T, left + T] (both the same for every chunk of that length)
        self._positions: dict[int, list[torch.Tensor]] = {}
        self._masks: dict[int, torch.Tensor] = {}

    def _projected_positions(self, pos_emb: torch.Tensor, frames: int) -> list[torch.Tensor]:
        """``linear_pos`` of the position table for a window of ``left + frames``, per layer, as
        [heads, positions, d_k]."""
        cached = self._positions.get(frames)
        if cached is None or cached[0].dtype != pos_emb.dtype:
            cached = []
            for layer in self.encoder.layers:
                attn = layer.self_attn
                cached.append(attn.linear_pos(pos_emb)[0].view(-1, attn.h, attn.d_k).transpose(0, 1).contiguous())
            self._positions[frames] = cached
        return cached

    def _mask_table(self, frames: int, device, dtype) -> torch.Tensor:
        """NeMo's attention mask of a chunk of ``frames`` after a cache holding ``n`` real frames, for
        every n in 0..left, as an additive table [left + 1, 1, frames, left + frames]: 0 where a query
        frame sees a window frame, NeMo's ``-INF_VAL`` where not."""
        import torch
        from nemo.collections.asr.parts.submodules.multi_head_attention import INF_VAL

        table = self._masks.get(frames)
        if table is None or table.dtype != dtype:
            enc, left = self.encoder, self.plan.cache_channel
            cached = torch.arange(left + 1, device=device)
            full = torch.full((left + 1,), frames + left, dtype=torch.int64, device=device)
            _, masked = enc._create_masks(att_context_size=enc.att_context_size, padding_length=full,
                                          max_audio_length=frames + left, offset=left - cached, device=device)
            masked = masked[:, left:]  # [left + 1, T, left + T], True: masked
            if not bool((~masked).any(-1).all()):  # NeMo zeroes such a row's output; the folded step would not
                raise ValueError("a chunk frame that sees no frame at all: the folded conformer step cannot take "
                                 "this attention context")
            table = (masked.to(dtype) * -INF_VAL).unsqueeze(1)
            self._masks[frames] = table
        return table

    def prepare(self, x: torch.Tensor) -> None:
        """Make the position table and the attention masks for chunks as long as ``x`` [B, T, d_model]
        now, at load: a captured step must find them made (made inside a bucket's capture, they would
        be that graph's work and memory, and the other buckets' calls would differ from their captures)."""
        _, pos_emb = self.encoder.pos_enc(x=x, cache_len=self.plan.cache_channel)
        self._projected_positions(pos_emb, x.shape[1])
        self._mask_table(x.shape[1], x.device, x.dtype)

    def encode(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, Commit]:
        """Pre-encoded frames ``x`` [B, T, d_model] of the sessions in ``slots`` to encoder output
        [B, d_model, T], and the call that advances their caches by the chunk (nothing is written
        before it)."""
        import torch

        pool, left = self.pool, self.plan.cache_channel
        frames = x.shape[1]
        length = pool.length.index_select(0, slots)  # [B]
        x, pos_emb = self.encoder.pos_enc(x=x, cache_len=left)  # xscale; positions for left + T
        positions = self._projected_positions(pos_emb, frames)
        # every frame of a chunk is real (the step pads nothing), so NeMo's padding mask is all False
        mask = self._mask_table(frames, x.device, x.dtype).index_select(0, length)  # [B, 1, T, left + T]
        if frames > pool.room:
            raise ValueError(f"a chunk of {frames} encoder frames exceeds the caches' room of {pool.room}")
        # every layer's caches in one gather each; the attention caches with room for the chunk: the
        # windows the layers write their new keys and values into and read
        kv_rows = pool.kv.index_select(0, slots)[:, :, :left + frames]  # [B, layers, left + T, 2 D]
        time_rows = pool.time.index_select(1, slots)  # [layers, B, D, K - 1]
        new_time = []
        for i, weights in enumerate(self.weights):
            x, conv_window = conformer_layer.conformer_step(x, weights, kv_rows[:, i], time_rows[i], positions[i],
                                                            mask)
            new_time.append(conv_window[:, :, -pool.shape[3]:])

        # everything the commit writes is made here: the commit itself only copies (it cannot run
        # out of memory half-way and leave one cache advanced and another not)
        kv_next, time_next = kv_rows[:, :, frames:], torch.stack(new_time)
        length_rows = torch.clamp(length + frames, max=left)

        def apply() -> None:
            pool.kv[:, :, :left].index_copy_(0, slots, kv_next)
            pool.time.index_copy_(1, slots, time_next)
            pool.length.index_copy_(0, slots, length_rows)

        return x.transpose(1, 2), apply
