"""CSM generation, one codec frame per call (blocking: it runs on the TTS worker thread).

CSM is a Llama-style *backbone* over a sequence of text tokens and audio frames (a frame enters as the
sum of its codebooks' embeddings) that predicts each frame's first codebook, and a small *depth
decoder* that predicts the other codebooks of that frame from the backbone's last hidden state. The
prompt of one segment is ``<bos>[speaker]text<eos>`` followed by its audio frames and an all-zero
end-of-audio frame; generation of a segment stops when the model samples that all-zero frame.

One :class:`Reply` holds the state of one spoken reply: the backbone KV cache (starting from the voice
prompt's cached prefix, then every earlier segment of the reply, so voice and prosody carry over),
the streaming codec decoder's state (one per reply, so segment joins are seamless) and the sampler's
random generator. :meth:`CsmEngine.step` makes one frame and, when a chunk is full or the segment
ends, decodes the chunk to audio: callers can stop between any two frames.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from duplex.tts.codec import CodecState, StreamingDecoder, StreamingEncoder
from duplex.tts.depth import DepthDecoder

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sampling:
    """How codes are drawn (CSM's defaults: top-k 50 at temperature 0.9; temperature 0 = greedy)."""

    temperature: float = 0.9
    top_k: int = 50


@dataclass
class Voice:
    """An encoded voice prompt: transcript and codec frames, and the backbone KV cache of that prefix."""

    text: str
    codes: torch.Tensor  # [T, K] long
    prefix: Any = None  # DynamicCache after the prefix, computed once on first use

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


@dataclass
class SegmentRecord:
    """One segment of a reply as the backbone saw it (to rebuild the context when it runs out)."""

    text: str
    ids: list[int]
    frames: list[torch.Tensor] = field(default_factory=list)  # each [K]


@dataclass
class Reply:
    """Everything one reply carries from frame to frame."""

    voice: Voice | None
    cache: Any  # the backbone's DynamicCache
    generator: torch.Generator
    codec: CodecState | None  # None once released
    chunk_frames: int
    unfed: torch.Tensor | None = None  # [1, n, H] embeddings not yet through the backbone
    hidden: torch.Tensor | None = None  # [1, H] backbone output after the latest input
    pending: list[torch.Tensor] = field(default_factory=list)  # generated frames not yet decoded, each [K]
    segment: SegmentRecord | None = None
    max_frames: int = 0
    stop_at_eos: bool = True
    history: list[SegmentRecord] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)  # every frame of the reply, for inspection
    closed: bool = False

    def release(self) -> None:
        """Drop the KV cache and decoder state (the reply is over); its frames stay for inspection."""
        self.closed = True
        self.cache = self.codec = self.unfed = self.hidden = None


@dataclass(frozen=True)
class Step:
    """What one :meth:`CsmEngine.step` made: audio when a chunk was decoded, and whether the segment ended."""

    pcm: np.ndarray | None  # [n * frame_size] float32 in [-1, 1]
    segment_frames: int
    done: bool


def _no_grad_context():
    import torch

    return torch.no_grad()


def _no_grad(fn: Callable) -> Callable:
    """Run ``fn`` without autograd (worker threads have it off already; build-time callers may not)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """``logits`` ``[B, V]`` -> token ids ``[B]`` (top-k sampling at a temperature, or greedy)."""
    import torch

    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        values, indices = logits.topk(sampling.top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
        return indices.gather(-1, choice)[:, 0]
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


class CsmEngine:
    """A loaded CSM + Mimi and the blocking steps of streaming synthesis."""

    def __init__(self, model, tokenizer, *, speaker: int = 0, sampling: Sampling = Sampling()) -> None:
        from duplex.tts.configs import token_ids

        self.model = model
        self.tokenizer = tokenizer
        self.speaker = speaker
        self.sampling = sampling
        cfg = model.config
        codec_cfg = cfg.codec_config
        self.num_codebooks = int(cfg.num_codebooks)
        self.codebook_size = int(codec_cfg.codebook_size)
        self.vocab_size = int(cfg.vocab_size)
        self.frame_size = int(codec_cfg.frame_size)
        self.sample_rate = int(codec_cfg.sampling_rate)
        self.max_positions = int(cfg.max_position_embeddings)
        if int(codec_cfg.num_quantizers) != self.num_codebooks:
            raise ValueError(f"CSM predicts {self.num_codebooks} codebooks but its codec has "
                             f"{codec_cfg.num_quantizers}")
        self.depth = DepthDecoder(model.depth_decoder)
        self.decoder = StreamingDecoder(model.codec_model)
        self.encoder = StreamingEncoder(model.codec_model)
        ids = token_ids(tokenizer)
        self.bos, self.eos = ids["bos"], ids["eos"]
        self.device = next(model.backbone_model.parameters()).device
        self.on_frame: Callable[[int], None] | None = None  # test hook, called on the worker before each frame
        self.frames_generated = 0
        self.stage_seconds: dict[str, float] | None = None  # set to {} to time backbone / depth / decode
        self.frame_rate = self.sample_rate / self.frame_size
        with _no_grad_context():
            self._eos_embed = self._embed_frames(self._zeros_frame()[None])  # [1, 1, H]

    # -- prompt pieces ---------------------------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        body = self.tokenizer.encode(f"[{self.speaker}]{text}", add_special_tokens=False)
        return [self.bos, *body, self.eos]

    def _zeros_frame(self) -> torch.Tensor:
        import torch

        return torch.zeros(self.num_codebooks, dtype=torch.long, device=self.device)

    def _embed_text(self, ids: list[int]) -> torch.Tensor:
        import torch

        return self.model.embed_text_tokens(torch.tensor([ids], device=self.device))  # [1, n, H]

    def _embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[T, K]`` -> ``[1, T, H]`` (the sum of each frame's codebook embeddings)."""
        return self.model.backbone_model.embed_tokens(codes[None])

    def _record_embeds(self, record: SegmentRecord) -> torch.Tensor:
        import torch

        parts = [self._embed_text(record.ids)]
        if record.frames:
            parts.append(self._embed_frames(torch.stack(record.frames)))
        parts.append(self._eos_embed)
        return torch.cat(parts, dim=1)

    def _forward(self, cache, embeds: torch.Tensor) -> torch.Tensor:
        out = self.model.backbone_model(inputs_embeds=embeds, cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1]  # [1, H]

    @staticmethod
    def _new_cache():
        from transformers import DynamicCache

        return DynamicCache()

    # -- voices ----------------------------------------------------------------------------------

    @_no_grad
    def encode_voice(self, pcm: np.ndarray, text: str, block_frames: int = 10) -> Voice:
        """Encode a validated 24 kHz clip with the streaming encoder (in blocks, as a live voice would)."""
        import torch

        audio = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))[None]
        rest = (-audio.shape[-1]) % self.frame_size  # complete the last frame with silence
        audio = torch.nn.functional.pad(audio, (0, rest))
        state = self.encoder.new_state()
        block = block_frames * self.frame_size
        codes = [self.encoder.encode(audio[:, i:i + block], state) for i in range(0, audio.shape[-1], block)]
        return Voice(text=text, codes=torch.cat(codes, dim=-1)[0].T.contiguous().to(self.device))

    def _prefix(self, voice: Voice | None):
        import torch

        if voice is None:
            return self._new_cache()
        if voice.prefix is None:
            cache = self._new_cache()
            embeds = torch.cat([self._embed_text(self.text_ids(voice.text)), self._embed_frames(voice.codes),
                                self._eos_embed], dim=1)
            self._forward(cache, embeds)
            voice.prefix = cache
        return copy.deepcopy(voice.prefix)

    # -- one reply -------------------------------------------------------------------------------

    @_no_grad
    def new_reply(self, voice: Voice | None, seed: int, chunk_frames: int) -> Reply:
        import torch

        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return Reply(voice=voice, cache=self._prefix(voice), generator=generator, codec=self.decoder.new_state(),
                     chunk_frames=chunk_frames)

    @_no_grad
    def begin_segment(self, reply: Reply, text: str, max_frames: int, *, stop_at_eos: bool = True) -> None:
        """Queue the next segment's text after what the reply has said so far."""
        import torch

        if reply.segment is not None:
            raise RuntimeError("begin_segment called before the previous segment ended")
        record = SegmentRecord(text, self.text_ids(text))
        prefix_len = reply.voice.frames + len(self.text_ids(reply.voice.text)) + 1 if reply.voice else 0
        room = self.max_positions - prefix_len - len(record.ids) - 1
        if room < 1:
            raise ValueError(f"segment of {len(record.ids)} tokens does not fit the model's "
                             f"{self.max_positions} positions after the voice prompt")
        max_frames = min(max_frames, room)
        text_embeds = self._embed_text(record.ids)
        unfed_len = 0 if reply.unfed is None else reply.unfed.shape[1]
        if reply.cache.get_seq_length() + unfed_len + len(record.ids) + max_frames + 1 > self.max_positions:
            self._rebuild(reply, room - max_frames)
        reply.unfed = text_embeds if reply.unfed is None else torch.cat([reply.unfed, text_embeds], dim=1)
        reply.segment, reply.max_frames, reply.stop_at_eos = record, max_frames, stop_at_eos

    def _rebuild(self, reply: Reply, budget: int) -> None:
        """The context would overflow: restart from the voice prefix plus the newest segments that fit."""
        import torch

        kept: list[SegmentRecord] = []
        for record in reversed(reply.history):
            cost = len(record.ids) + len(record.frames) + 1
            if cost > budget:
                break
            kept.insert(0, record)
            budget -= cost
        reply.cache = self._prefix(reply.voice)
        reply.unfed = torch.cat([self._record_embeds(r) for r in kept], dim=1) if kept else None
        reply.history = kept

    @_no_grad
    def step(self, reply: Reply) -> Step:
        """Make the next frame of the current segment; decode a chunk when one is full or the segment ends."""
        import torch

        if reply.closed or reply.segment is None:
            raise RuntimeError("step on a closed reply or outside a segment")
        if self.on_frame is not None:
            self.on_frame(self.frames_generated)
        t = self._lap(None, time.perf_counter())
        if reply.unfed is not None:
            reply.hidden = self._forward(reply.cache, reply.unfed)
            reply.unfed = None
        t = self._lap("backbone", t)
        assert reply.hidden is not None
        codes = self._sample_frame(reply.hidden, reply.generator)  # [K]
        t = self._lap("depth", t)
        self.frames_generated += 1
        segment = reply.segment
        eos = reply.stop_at_eos and not bool(codes.any())
        if not eos:
            segment.frames.append(codes)
            reply.pending.append(codes)
            reply.frames.append(codes)
            reply.unfed = self._embed_frames(codes[None])
        done = eos or len(segment.frames) >= reply.max_frames
        pcm = None
        if reply.pending and (done or len(reply.pending) >= reply.chunk_frames):
            chunk = torch.stack(reply.pending, dim=-1)[None]  # [1, K, n]
            reply.pending = []
            assert reply.codec is not None
            audio = self.decoder.decode(chunk, reply.codec)[0]
            pcm = audio.float().clamp_(-1.0, 1.0).cpu().numpy()
            self._lap("decode", t)
        if done:
            reply.unfed = self._eos_embed if reply.unfed is None else torch.cat([reply.unfed, self._eos_embed], 1)
            reply.history.append(segment)
            reply.segment = None
        return Step(pcm=pcm, segment_frames=len(segment.frames), done=done)

    def _lap(self, stage: str | None, start: float) -> float:
        """With ``stage_seconds`` set (benchmarks), add the time since ``start`` to ``stage``."""
        if self.stage_seconds is None:
            return start
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if stage is not None:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + now - start
        return now

    def _sample_frame(self, hidden: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The backbone's hidden state ``[1, H]`` -> one frame of codes ``[K]`` (first codebook, then depth)."""
        n_codes = self.codebook_size

        def draw(logits: torch.Tensor) -> torch.Tensor:  # only the codec's codes, never the LM's extra ids
            return sample(logits[:, :n_codes], self.sampling, generator)

        return self.depth.sample(hidden, draw(self.model.lm_head(hidden)), draw)
