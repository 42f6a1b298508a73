"""Cache-aware FastConformer stepping: chunk plan, per-session cache slots, one batched step.

A chunked-limited FastConformer with attention context ``[left, right]`` consumes chunks of
``right + 1`` encoder frames (``factor * (right + 1)`` mel frames; the first chunk is
``1 + factor * right`` mel frames because the causal subsampling emits its first frame from one mel
frame). Later chunks are prefixed with the last ``pre_cache`` mel frames (the subsampling's
receptive field) and the first ``drop`` pre-encoded frames, which saw that prefix's left padding
instead of real context, are dropped. Each chunk then runs through the conformer layers with the
attention cache (``left`` frames per layer) and the causal-convolution cache, which is what makes
streaming output equal offline output for the same attention context.

To batch sessions that are at different points (first chunk or not, caches partly filled), the
subsampling runs per group (first chunks / later chunks) and the layers run on the pre-encoded
frames of everyone together (``bypass_pre_encode``), each session with its own cache length.
Caches live in a :class:`CachePool`: tensors allocated up front with one slot per session, gathered
and scattered by slot index around each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from duplex.asr.decoding import Commit
from duplex.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk sizes of one attention context, as NeMo's ``streaming_cfg`` defines them."""

    context: tuple[int, int]  # [left, right] attention context in encoder frames
    factor: int  # mel frames per encoder frame
    first_mel: int  # mel frames in the first chunk
    mel: int  # mel frames in every later chunk
    pre_cache: int  # mel frames of the previous chunk prepended to later chunks
    drop: int  # pre-encoded frames dropped from later chunks
    out: int  # encoder frames per chunk
    cache_channel: int  # attention cache length (frames)
    cache_time: int  # convolution cache length (frames)

    def mel_for_chunks(self, n_chunks: int) -> int:
        """Mel frames consumed by the first ``n_chunks`` chunks."""
        return 0 if n_chunks <= 0 else self.first_mel + (n_chunks - 1) * self.mel

    def pre_encoded_len(self, n_mel: int, first: bool) -> int:
        """Encoder frames the subsampling gives for ``n_mel`` new mel frames (after the drop)."""
        n = n_mel if first else n_mel + self.pre_cache
        if n <= 0:
            return 0
        for _ in range(self.factor.bit_length() - 1):  # log2(factor) stride-2 causal convolutions
            n = n // 2 + 1
        return n if first else max(0, n - self.drop)


def parse_context(text: str | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """``"[70,6]"`` (or a list) to ``(70, 6)``, with a clear error for anything else."""
    if isinstance(text, str):
        parts = text.strip().strip("[]()").split(",")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
    else:
        values = [int(v) for v in text]
    if len(values) != 2 or values[0] < 0 or values[1] < 0:
        raise ConfigError(f"ASR latency must be an attention context [left,right] of two non-negative "
                          f"integers such as [70,6], got {text!r}")
    return values[0], values[1]


def check_cache_aware(model) -> None:
    """Raise a clear error unless ``model`` has a cache-aware (chunked-limited, causal) encoder."""
    from nemo.collections.asr.modules.conformer_encoder import ConformerEncoder
    from nemo.collections.asr.parts.submodules.subsampling import ConvSubsampling

    enc = getattr(model, "encoder", None)
    name = type(enc).__name__
    if not isinstance(enc, ConformerEncoder):
        raise ConfigError(f"the ASR model's encoder ({name}) is not a cache-aware streaming Conformer; "
                          "use a model such as nvidia/stt_en_fastconformer_hybrid_large_streaming_multi")
    problems = []
    if enc.att_context_style != "chunked_limited":
        problems.append(f"attention style {enc.att_context_style!r} (needs 'chunked_limited')")
    if any(c[0] < 0 or c[1] < 0 for c in enc.att_context_size_all):
        problems.append(f"unlimited attention context {enc.att_context_size_all}")
    if enc.conv_context_size[1] != 0:
        problems.append(f"non-causal convolutions (context {enc.conv_context_size})")
    if not isinstance(enc.pre_encode, ConvSubsampling) or not enc.pre_encode.is_causal:
        problems.append("non-causal subsampling")
    if getattr(enc, "reduction_position", None) is not None:
        problems.append("a time-reduction layer")
    if problems:
        raise ConfigError("the ASR model's encoder is not cache-aware (trained for offline use): "
                          + "; ".join(problems) + ". Use a cache-aware streaming FastConformer.")


def select_context(model, context: tuple[int, int]) -> ChunkPlan:
    """Set ``model.encoder``'s attention context and return its chunk plan."""
    enc = model.encoder
    supported = [tuple(int(v) for v in c) for c in enc.att_context_size_all]
    if context not in supported:
        raise ConfigError(f"this ASR model is trained for the attention contexts "
                          f"{', '.join('[%d,%d]' % c for c in supported)}; got [{context[0]},{context[1]}]")
    enc.set_default_att_context_size(list(context))
    return plan_of(model)


def plan_of(model) -> ChunkPlan:
    """The chunk plan of ``model.encoder``'s current attention context (checked against NeMo's)."""
    enc = model.encoder
    cfg = enc.streaming_cfg
    left, right = (int(v) for v in enc.att_context_size)
    factor = int(enc.subsampling_factor)
    if (left + 0) % (right + 1):
        raise ConfigError(f"attention context [{left},{right}]: left must be a multiple of right + 1")
    first_mel, mel = cfg.chunk_size if isinstance(cfg.chunk_size, list) else (cfg.chunk_size, cfg.chunk_size)
    pre = cfg.pre_encode_cache_size
    pre_cache = pre[1] if isinstance(pre, list) else pre
    plan = ChunkPlan(context=(left, right), factor=factor, first_mel=int(first_mel), mel=int(mel),
                     pre_cache=int(pre_cache), drop=int(cfg.drop_extra_pre_encoded), out=right + 1,
                     cache_channel=int(cfg.last_channel_cache_size), cache_time=int(enc.conv_context_size[0]))
    # The arithmetic the live path relies on: every chunk yields exactly `out` encoder frames.
    if (plan.first_mel != 1 + factor * right or plan.mel != factor * (right + 1)
            or plan.pre_encoded_len(plan.first_mel, True) != plan.out
            or plan.pre_encoded_len(plan.mel, False) != plan.out or cfg.cache_drop_size != 0):
        raise ConfigError(f"unsupported streaming layout for attention context [{left},{right}]: {cfg}")
    return plan


class CachePool:
    """Encoder caches of many sessions, one slot each: allocated up front, grown by doubling.

    Tensors (on the model's device and dtype): ``channel`` [layers, slots, cache_channel, d_model],
    ``time`` [layers, slots, d_model, cache_time], ``length`` [slots] (valid frames in ``channel``).
    Only the worker thread touches the tensors.
    """

    def __init__(self, encoder, plan: ChunkPlan, capacity: int, device: str, dtype: torch.dtype) -> None:
        self.encoder = encoder
        self.plan = plan
        self.device, self.dtype = device, dtype
        self.capacity = 0
        self.channel: torch.Tensor  # the three are allocated (and regrown) by grow()
        self.time: torch.Tensor
        self.length: torch.Tensor
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        import torch

        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        ch, tm, ln = self.encoder.get_initial_cache_state(batch_size=capacity, dtype=self.dtype, device=self.device)
        if self.capacity:
            ch[:, : self.capacity] = self.channel
            tm[:, : self.capacity] = self.time
            ln[: self.capacity] = self.length
        self.channel, self.time, self.length = ch, tm, ln.to(torch.int64)
        self.capacity = capacity

    def reset(self, slots: torch.Tensor) -> None:
        """Empty the caches of ``slots`` (a new session: zero context, as offline at time 0)."""
        self.channel[:, slots] = 0
        self.time[:, slots] = 0
        self.length[slots] = 0


def pre_encode(encoder, plan: ChunkPlan, mel: torch.Tensor, first: bool) -> torch.Tensor:
    """Subsample mel frames ``[B, n_mels, T]`` (pre-encode cache included for later chunks).

    Returns ``[B, T', d_model]``: the frames the conformer layers take, first ``drop`` removed for
    later chunks. Every row is whole (no padding), so NeMo's length masks between the convolutions
    (``MaskedConvSequential``: a multiply by ones before each layer, and the lengths worked out
    along the way, about 45 kernels) change nothing: a 2-D convolution subsampling runs its layers
    alone (tested equal to NeMo's ``pre_encode``).
    """
    import torch

    sub = encoder.pre_encode
    x = mel.transpose(1, 2)  # [B, T, n_mels]
    if _plain_convolutions(sub, x):
        h = x.unsqueeze(1)  # [B, 1, T, n_mels]
        for layer in sub.conv:
            h = layer(h)
        b, _, t, _ = h.shape
        x = sub.out(h.transpose(1, 2).reshape(b, t, -1))
    else:
        lengths = torch.full((mel.size(0),), mel.size(2), dtype=torch.int64, device=mel.device)
        x, _ = sub(x=x, lengths=lengths)
    return x if first else x[:, plan.drop:]


def _plain_convolutions(sub, x: torch.Tensor) -> bool:
    """Whether NeMo's subsampling ``sub`` on ``x`` [B, T, n_mels] is its 2-D convolutions and output
    product alone (not split into pieces for a huge input, nor a 1-D or stacking subsampling)."""
    from nemo.collections.asr.parts.submodules.subsampling import ConvSubsampling

    if type(sub) is not ConvSubsampling or not sub.conv2d_subsampling:
        return False
    if sub.subsampling_conv_chunking_factor != 1:
        return False
    return x.numel() * sub._conv_channels <= 2**31 * sub._stride * sub._stride  # NeMo's own test for splitting


def encode(encoder, pool: CachePool, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, Commit]:
    """Run the conformer layers on pre-encoded frames ``x`` [B, T, d_model] of the sessions in ``slots``.

    Returns the encoder output [B, d_model, T] and the call that advances the sessions' caches by the
    chunk (nothing is written before it; a provisional look at a partial chunk never calls it).
    """
    import torch

    channel = pool.channel.index_select(1, slots)  # [L, B, C, D]
    time = pool.time.index_select(1, slots)  # [L, B, D, K]
    length = pool.length.index_select(0, slots)  # [B]
    n = torch.full((x.size(0),), x.size(1), dtype=torch.int64, device=x.device)
    out = encoder.forward_internal(x, n, cache_last_channel=channel, cache_last_time=time,
                                   cache_last_channel_len=length, bypass_pre_encode=True)
    encoded, _, channel, time, length = encoder.streaming_post_process(out, keep_all_outputs=True)
    # made here, so the commit only copies (it cannot fail half-way)
    channel, time, length = channel.to(pool.dtype), time.to(pool.dtype), length.to(torch.int64)

    def apply() -> None:
        pool.channel.index_copy_(1, slots, channel)
        pool.time.index_copy_(1, slots, time)
        pool.length.index_copy_(0, slots, length)

    return encoded, apply


class NemoLayers:
    """The conformer layers stepped by NeMo's own streaming forward (inputs cached, :class:`CachePool`)."""

    def __init__(self, encoder, plan: ChunkPlan, capacity: int, device: str, dtype: torch.dtype) -> None:
        self.encoder = encoder
        self.pool = CachePool(encoder, plan, capacity, device, dtype)

    def encode(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, Commit]:
        return encode(self.encoder, self.pool, x, slots)
