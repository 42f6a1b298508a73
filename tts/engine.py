"""CSM generation for every spoken reply at once: one batched frame step, one batched codec decode.

CSM is a Llama-style *backbone* over a sequence of text tokens and audio frames (a frame enters as the
sum of its codebooks' embeddings) that predicts each frame's first codebook, and a small *depth
decoder* that predicts the other codebooks of that frame from the backbone's last hidden state. The
prompt of one segment is ``<bos>[speaker]text<eos>`` followed by its audio frames and an all-zero
end-of-audio frame; generation of a segment stops when the model samples that all-zero frame.

:class:`CsmEngine` owns the weights (backbone and depth decoder run through
:class:`~duplex.engine.decoder.LeanDecoder`), a K/V pool with one backbone row per reply being
spoken, and the **frame step**: for rows ``0..bucket-1`` at once, the backbone runs each row's next
input (its previous frame, or the last token of a new segment's text), the first codebook is
sampled, then all depth-decoder steps run unrolled with every codebook sampled inside the step
(:mod:`duplex.engine.sampling`, per-row seeds and counters), and each row's next input is the new
frame's embedding. Rows without a frame to make sit at the scratch position. The step's shapes
depend only on the bucket, so on CUDA each bucket is one captured graph (:mod:`duplex.engine.graphs`)
and a frame costs one replay and one host sync for every reply together. The step ends by decoding
each row's new frame with the Mimi codec (:class:`~duplex.tts.slot_codec.SlotDecoder`, its state in
static rows beside the K/V rows), so that one copy brings codes and audio together; the host hands a
reply's audio out in chunks of ``chunk_frames`` frames, and drops the audio of the end frame, which
the decoder's state never took in (the device knows a frame is the end before the host does).

One :class:`Reply` holds what one reply carries from frame to frame: its backbone row (starting with
the voice prompt's cached prefix, then every earlier segment of the reply, so voice and prosody carry
over), its codec decoder row (one per reply, so segment joins are seamless) and its sampler counter.
Everything here is blocking and runs on the TTS worker thread; callers can stop between any two steps.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from duplex.engine import fusion
from duplex.engine.decoder import LeanDecoder
from duplex.engine.graphs import BucketedStep, buckets_for, lengths_for
from duplex.engine.sampling import draw_key, race, scaled_gumbel, token_keys
from duplex.engine.slots import SlotPool
from duplex.engine.staging import PassRows, Readback, Staged
from duplex.tts.codec import StreamingEncoder
from duplex.tts.slot_codec import SlotDecoder

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sampling:
    """How codes are drawn (CSM's defaults: top-k 50 at temperature 0.9; temperature 0 = greedy)."""

    temperature: float = 0.9
    top_k: int = 50


@dataclass
class Voice:
    """An encoded voice prompt: transcript and codec frames, and the backbone K/V of that prefix."""

    text: str
    codes: torch.Tensor  # [T, K] long
    prefix: list[torch.Tensor] | None = None  # per layer [2, H_kv, n, D] (SlotKV.keep), once used

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


@dataclass
class SegmentRecord:
    """One segment of a reply as the backbone saw it (to rebuild the context when it runs out)."""

    text: str
    ids: list[int]
    frames: list[torch.Tensor] = field(default_factory=list)  # each [K] (CPU)


@dataclass(eq=False)
class Reply:
    """Everything one reply carries from frame to frame."""

    voice: Voice | None
    row: int  # its row of the backbone K/V pool, of the frame step and of the codec (-1 once released)
    seed: int
    chunk_frames: int
    prefix_length: int = 0  # backbone positions of the voice prefix
    length: int = 0  # backbone positions filled
    staged: bool = False  # the frame step's input buffer holds this reply's next input
    ended_at_limit: bool = False  # the last segment stopped at its frame limit: an end frame must follow
    drawn: int = 0  # frames sampled so far (the sampler's counter)
    audio: list[np.ndarray] = field(default_factory=list)  # decoded frames not yet handed out, each [frame_size]
    segment: SegmentRecord | None = None
    max_frames: int = 0
    stop_at_eos: bool = True
    history: list[SegmentRecord] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)  # every frame of the reply, for inspection
    closed: bool = False
    held: Any = None  # its Output of a frame step run ahead (booked, not yet handed out)

    @property
    def active(self) -> bool:
        return not self.closed and self.segment is not None


SEGMENT_LENGTHS = (16, 32, 64)  # embeddings per reply a captured segment pass holds (more: alone, in pieces)


@dataclass(frozen=True)
class SegmentStart:
    """A reply's next segment of text, to start (:meth:`CsmEngine.begin_segments`)."""

    reply: Reply
    text: str
    max_frames: int
    stop_at_eos: bool = True


@dataclass(frozen=True)
class FrameLaunch:
    """A frame step launched and not yet read: its replies, and its end."""

    states: list[Reply]
    end: Any  # its copy out's end (a CUDA event; None on the CPU, where the copy is done)


@dataclass(frozen=True)
class Step:
    """What one frame step made for one reply: audio when a chunk was decoded, and whether the segment ended."""

    pcm: np.ndarray | None  # [n * frame_size] float32 in [-1, 1]
    segment_frames: int
    done: bool


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _no_grad(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` without autograd (worker threads have it off already; build-time callers may not)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


class CsmEngine:
    """A loaded CSM + Mimi, its K/V pool of ``slots`` replies, and the blocking steps of synthesis."""

    def __init__(self, model, tokenizer, *, speaker: int = 0, sampling: Sampling = Sampling(), slots: int = 4,
                 graphs: bool = True, compile: bool = False) -> None:
        import torch
        import torch.nn.functional as F

        from duplex.tts.configs import token_ids

        if slots < 1:
            raise ValueError(f"the TTS engine needs at least one reply slot, got {slots}")
        self.model = model
        self.tokenizer = tokenizer
        self.speaker = speaker
        self._sampling = sampling
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
        depth = model.depth_decoder
        if cfg.attention_bias or depth.config.attention_bias:
            raise ValueError("the CSM engine supports CSM's bias-free attention only")
        self.backbone = LeanDecoder(model.backbone_model, cfg, positions=self.max_positions)
        self.depth = LeanDecoder(depth.model, depth.config, positions=self.num_codebooks)
        self.depth_embed = depth.model.embed_tokens.weight  # [K * V, H_backbone]
        self.depth_project = depth.model.inputs_embeds_projector.weight  # [hidden, H_backbone]
        self.codebook_heads = depth.codebooks_head.weight  # [K - 1, hidden, V]
        self.codec = SlotDecoder(model.codec_model, slots)
        self.encoder = StreamingEncoder(model.codec_model)
        ids = token_ids(tokenizer)
        self.bos, self.eos = ids["bos"], ids["eos"]
        self.device = self.backbone.device
        self.dtype = self.backbone.dtype
        self.slots = slots
        self.kv = self.backbone.new_kv(slots)
        self.depth_kv = self.depth.new_kv(slots, positions=self.num_codebooks)
        self.rows = SlotPool("TTS reply slots", slots,
                             full_hint="raise engine_slots (--engine-slots) to speak more replies at once")
        self.on_frame: Callable[[int], None] | None = None  # test hook, called on the worker before each frame
        self.frames_generated = 0
        self.stage_seconds: dict[str, float] | None = None  # set to {} to time frame steps / decode
        self.frame_rate = self.sample_rate / self.frame_size
        dev = self.device
        k = self.num_codebooks
        self._keys = token_keys(self.codebook_size, dev)
        self._inputs = torch.zeros(slots, self.backbone.hidden, dtype=self.dtype, device=dev)  # next input per row
        # position, whether the end frame ends the segment (stop_at_eos)
        self._ints = Staged((2, slots), torch.long, dev)
        # each row's draw key of each codebook (duplex.engine.sampling.draw_key; made by the host):
        # codebook i of frame n draws with counter n * K + i
        self._draws = Staged((k, slots), torch.long, dev)
        self._temperature = Staged((slots,), torch.float32, dev)
        # the step's output, copied to the host in one piece: each row's codes, then its frame's audio
        self._out = torch.zeros(slots, k + self.frame_size, dtype=torch.float32, device=dev)
        # where a launched frame step leaves codes and audio (pinned: the copy runs as the step ends)
        self._readback = Readback((slots, k + self.frame_size), torch.float32, dev)
        self._rows = torch.arange(slots, device=dev)
        self._depth_positions = torch.arange(k, device=dev)
        self._codebook_ids = np.arange(k, dtype=np.int64)
        self._causal2 = torch.ones(2, 2, dtype=torch.bool, device=dev).tril()
        # codebook i's embedding table, already through the depth decoder's input projection
        # ([V, H_depth] each): a code's input is one lookup
        with torch.no_grad():
            projected = F.linear(self.depth_embed, self.depth_project)  # [K * V, H_depth]
        self._depth_tables = [projected[i * self.vocab_size:(i + 1) * self.vocab_size] for i in range(k)]
        # the depth steps after the first (every row at depth position p = 2 .. K - 1): the layers
        # with position p's RoPE folded into their qkv weights, so those steps run no RoPE
        # (three kernels a layer; a copy of the depth decoder's qkv weights per position)
        with torch.no_grad():
            self._depth_at = {p: self.depth.at_position(p) for p in range(2, k)}
        # the segment pass of several replies: each one's embeddings (copied on the device) and where
        # they go (K/V row, first position, count), captured per (batch, embeddings) bucket
        self._segment_x = torch.zeros(SEGMENT_LENGTHS[-1], slots, self.backbone.hidden, dtype=self.dtype, device=dev)
        self._segment_meta = PassRows(slots, dev, self.kv.scratch_row)
        self.segment_graphs = BucketedStep("tts segments", self._segment_fn, buckets_for(slots), SEGMENT_LENGTHS,
                                           device=str(dev), graphs=graphs)
        # attention lengths in powers of two: a reply's row is usually far from full
        self.graphs = BucketedStep("tts frame", self._frame_fn, buckets_for(slots), lengths_for(self.kv.positions),
                                   device=str(dev), graphs=graphs)
        with torch.inference_mode():
            self._eos_embed = self._embed_frames(self._zeros_frame()[None])[0]  # [1, H]
        self._race = race
        self.graphs.compiled = fusion.wanted(str(dev), compile)
        if self.graphs.compiled:  # fused layers and sampler (CUDA); compiled in capture(), at load
            self.backbone.compile()
            self.depth.compile()
            self._race = fusion.compile_fn(race)

    # -- prompt pieces ---------------------------------------------------------------------------

    @property
    def sampling(self) -> Sampling:
        """How codes are drawn, fixed for the engine's life: the captured frame step holds its top-k."""
        return self._sampling

    def text_ids(self, text: str) -> list[int]:
        body = self.tokenizer.encode(f"[{self.speaker}]{text}", add_special_tokens=False)
        return [self.bos, *body, self.eos]

    def _zeros_frame(self) -> torch.Tensor:
        import torch

        return torch.zeros(self.num_codebooks, dtype=torch.long, device=self.device)

    def _embed_text(self, ids: list[int]) -> torch.Tensor:
        import torch

        return self.model.embed_text_tokens(torch.tensor([ids], device=self.device))[0]  # [n, H]

    def _embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[T, K]`` -> ``[1, T, H]`` (the sum of each frame's codebook embeddings)."""
        return self.model.backbone_model.embed_tokens(codes[None])

    def _record_embeds(self, record: SegmentRecord) -> torch.Tensor:
        """A finished segment as the backbone saw it: text, frames, end frame ``[n, H]``."""
        import torch

        parts = [self._embed_text(record.ids)]
        if record.frames:
            parts.append(self._embed_frames(torch.stack(record.frames).to(self.device))[0])
        parts.append(self._eos_embed)
        return torch.cat(parts)

    def _prefill(self, reply: Reply, embeds: torch.Tensor) -> None:
        """Run ``embeds`` ``[n, H]`` into the reply's row after what it holds, alone: where the segment
        pass replays graphs, replays of its batch-1 bucket, one per piece of at most its longest
        bucket (a voice prompt or a rebuilt context is a few replays, not hundreds of kernels the
        host launches one by one); else an eager prefill of the row."""
        if self.segment_graphs.replays:
            longest = SEGMENT_LENGTHS[-1]
            for start in range(0, embeds.shape[0], longest):
                self._segment_pass([(reply, embeds[start:start + longest])])
            return
        self.backbone.prefill(embeds, self.kv, reply.row, reply.length)
        reply.length += embeds.shape[0]

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

    def _load_prefix(self, reply: Reply) -> None:
        """Put the voice prompt's K/V at the start of the reply's row (computed there on first use)."""
        import torch

        voice = reply.voice
        if voice is None:
            return
        if voice.prefix is None:
            embeds = torch.cat([self._embed_text(self.text_ids(voice.text)),
                                self._embed_frames(voice.codes)[0], self._eos_embed])
            self._prefill(reply, embeds)
            voice.prefix = self.kv.keep(reply.row, reply.length)
        else:
            reply.length = self.kv.restore(reply.row, voice.prefix)
        reply.prefix_length = reply.length

    # -- one reply -------------------------------------------------------------------------------

    @_no_grad
    def new_reply(self, voice: Voice | None, seed: int, chunk_frames: int) -> Reply:
        """A reply on the lowest free row (rows stay compact, so frame-step buckets stay small)."""
        reply = Reply(voice=voice, row=self.rows.take(), seed=seed, chunk_frames=chunk_frames)
        try:
            self.codec.reset(reply.row)
            self._load_prefix(reply)
        except BaseException:
            self.release(reply)
            raise
        return reply

    def release(self, reply: Reply) -> None:
        """Free the reply's row (the reply is over); its frames stay for inspection."""
        if reply.row >= 0:
            self.rows.give(reply.row)
            reply.row = -1
        reply.closed = True
        reply.segment = None

    @property
    def free_slots(self) -> int:
        return self.rows.free

    def begin_segment(self, reply: Reply, text: str, max_frames: int, *, stop_at_eos: bool = True) -> None:
        """Run the next segment's text after what the reply has said so far (its last token becomes
        the next frame step's input): :meth:`begin_segments` for one reply."""
        result, = self.begin_segments([SegmentStart(reply, text, max_frames, stop_at_eos)])
        if result is not None:
            raise result

    @_no_grad
    def begin_segments(self, starts: Sequence[SegmentStart]) -> list[Exception | None]:
        """Several replies' next segments at once: each one's text (after its last frame not yet run,
        and after an end frame if its segment stopped at the frame limit) runs into its row, all of
        them in one pass over the rows, captured per (batch, embeddings) bucket (a context rebuilt
        longer than the longest bucket, and without graphs one reply alone: :meth:`_prefill`, each
        on its own row); the last token of each becomes its next frame step's input. Returns per start None, or the error that stopped
        it (nothing of that reply changed)."""

        results: list[Exception | None] = [None] * len(starts)
        planned: list[tuple[SegmentStart, SegmentRecord, int, torch.Tensor]] = []
        for i, start in enumerate(starts):
            try:
                planned.append((start, *self._plan_segment(start)))
            except (RuntimeError, ValueError) as exc:
                results[i] = exc
        runs = [(start.reply, embeds[:-1]) for start, _, _, embeds in planned if embeds.shape[0] > 1]
        short = [run for run in runs if run[1].shape[0] <= SEGMENT_LENGTHS[-1]]
        if len(short) < 2 and not self.segment_graphs.replays:  # alone, no graph: its own row only, eager
            short = []
        for run in runs:
            if run[1].shape[0] > SEGMENT_LENGTHS[-1] or not short:
                self._prefill(*run)
        if short:
            self._segment_pass(short)
        for start, record, max_frames, embeds in planned:
            reply = start.reply
            self._inputs[reply.row] = embeds[-1]
            reply.staged, reply.ended_at_limit = True, False
            reply.segment, reply.max_frames, reply.stop_at_eos = record, max_frames, start.stop_at_eos
        return results

    def _segment_pass(self, runs: list[tuple[Reply, torch.Tensor]]) -> None:
        """Run each reply's embeddings ``[n, H]`` after what its row holds, all in one captured pass."""
        for i, (_, embeds) in enumerate(runs):
            self._segment_x[:embeds.shape[0], i] = embeds
        self._segment_meta.stage(self.segment_graphs.bucket(len(runs)),
                                 [(reply.row, reply.length, embeds.shape[0]) for reply, embeds in runs])
        self.segment_graphs.run(len(runs), max(e.shape[0] for _, e in runs))
        for reply, embeds in runs:
            reply.length += embeds.shape[0]

    def _segment_fn(self, b: int, t: int) -> None:
        """The captured segment pass: entry ``i < b`` runs its first ``count`` of ``t`` embeddings into
        K/V row ``row`` from position ``start`` (the others, and padding entries, at the scratch
        position), attending over the whole row."""
        rows, starts, counts = self._segment_meta.buffer[:, :b]
        self.backbone.prefill_rows(self._segment_x[:t, :b].transpose(0, 1), rows, starts, counts, self.kv)

    def _plan_segment(self, start: SegmentStart) -> tuple[SegmentRecord, int, torch.Tensor]:
        """What :meth:`begin_segments` runs for ``start``: its record, its frame limit and the
        embeddings to feed ``[n, H]`` (the context rebuilt first if they would overflow the row).
        Raises before changing anything when the segment cannot start."""
        import torch

        reply = start.reply
        if reply.closed:
            raise RuntimeError("begin_segment on a released reply")
        if reply.segment is not None:
            raise RuntimeError("begin_segment called before the previous segment ended")
        record = SegmentRecord(start.text, self.text_ids(start.text))
        room = self.max_positions - reply.prefix_length - len(record.ids) - 1
        if room < 1:
            raise ValueError(f"segment of {len(record.ids)} tokens does not fit the model's "
                             f"{self.max_positions} positions after the voice prompt")
        max_frames = min(start.max_frames, room)
        feed = []
        if reply.staged:  # the last frame of the previous segment, not yet run
            feed.append(self._inputs[reply.row][None])
        if reply.ended_at_limit:
            feed.append(self._eos_embed)
        feed.append(self._embed_text(record.ids))
        embeds = torch.cat(feed)  # [n, H]
        if reply.length + embeds.shape[0] + max_frames + 1 > self.max_positions:
            embeds = self._rebuild(reply, room - max_frames, self._embed_text(record.ids))
        return record, max_frames, embeds

    def _rebuild(self, reply: Reply, budget: int, text: torch.Tensor) -> torch.Tensor:
        """The context would overflow: restart from the voice prefix plus the newest segments that fit;
        returns what to feed (those segments, then ``text``)."""
        import torch

        kept: list[SegmentRecord] = []
        for record in reversed(reply.history):
            cost = len(record.ids) + len(record.frames) + 1
            if cost > budget:
                break
            kept.insert(0, record)
            budget -= cost
        reply.length = reply.prefix_length  # the prefix's K/V are still at the start of the row
        reply.history = kept
        return torch.cat([*(self._record_embeds(r) for r in kept), text])

    # -- the frame step ----------------------------------------------------------------------------

    def _frame_fn(self, b: int, length: int) -> None:
        """The captured step: one frame for rows ``0..b-1`` from the static buffers, the backbone
        attending over the first ``length`` positions of each row."""
        import torch
        import torch.nn.functional as F

        positions, stop = self._ints.buffer[:, :b]
        draws = self._draws.buffer[:, :b].T  # [b, K]
        temperature = self._temperature.buffer[:b]
        rows = self._rows[:b]
        n_codes, k, top_k = self.codebook_size, self.num_codebooks, self.sampling.top_k
        t = self._lap(None, time.perf_counter())
        hidden = self.backbone.decode(self._inputs[:b], positions, self.kv, rows, length, read_rows=slice(0, b))
        t = self._lap("backbone", t)
        greedy = self.sampling.temperature <= 0  # fixed for the engine's life: no noise at all
        if not greedy:  # the race's noise for every codebook of the frame at once, scaled by each
            # row's temperature (0: none, the row's draws are its argmax)
            noise = scaled_gumbel(draws, self._keys, temperature)  # [b, K, codes]

        def draw(logits: torch.Tensor, index: int) -> torch.Tensor:  # only the codec's codes
            if greedy:
                return logits[:, :n_codes].argmax(dim=-1)
            return self._race(logits[:, :n_codes], noise[:, index], top_k)

        codes = [draw(F.linear(hidden, self.model.lm_head.weight), 0)]
        x = torch.stack([F.linear(hidden, self.depth_project), F.embedding(codes[0], self._depth_tables[0])],
                        dim=1)  # [b, 2, H_depth]: positions 0, 1
        pos = self._depth_positions[:2].expand(b, 2)
        mask = self._causal2.expand(b, 2, 2)
        h = self.depth.forward(x, pos, self.depth_kv, slice(0, b), rows, 2, mask)
        for index in range(1, k):
            codes.append(draw(h[:, -1] @ self.codebook_heads[index - 1], index))
            if index == k - 1:
                break
            x = F.embedding(codes[-1], self._depth_tables[index])[:, None]  # [b, 1, H_depth]
            p = index + 1
            pos = self._depth_positions[p:p + 1].expand(b, 1)
            # every row at position p: its rotation is in the weights of _depth_at[p]
            h = self.depth.forward(x, pos, self.depth_kv, slice(0, b), rows, p + 1, None,
                                   layers=self._depth_at[p])  # sees positions 0..p
        frame = torch.stack(codes, dim=1)  # [b, K]
        active = positions < self.kv.scratch_position
        following = self.model.backbone_model.embed_tokens(frame[:, None])[:, 0]  # [b, H]
        self._inputs[:b] = torch.where(active[:, None], following, self._inputs[:b])
        t = self._lap("depth", t)
        end = (frame == 0).all(dim=-1) & (stop != 0)  # the end frame: decoded, never taken into the state
        pcm = self.codec.step(frame, active & ~end)
        self._out[:b, :k] = frame
        self._out[:b, k:] = pcm.float().clamp(-1.0, 1.0)
        self._lap("decode", t)

    @_no_grad
    def step_frames(self, replies: Sequence[Reply]) -> list[Step]:
        """One frame for each of ``replies`` (each inside a segment) and its audio, in one batched step
        (:meth:`launch_frames`, :meth:`collect_frames`, :meth:`book_frames`); a reply's audio is
        handed out when its chunk is full or its segment ended."""
        return self.book_frames(replies, self.collect_frames(self.launch_frames(replies)))

    @_no_grad
    def launch_frames(self, replies: Sequence[Reply]) -> FrameLaunch:
        """Start one frame step of ``replies`` without waiting for it: its codes and audio are copied
        into a pinned host table as it ends (:meth:`collect_frames` reads them; it comes before the
        next launch)."""
        for reply in replies:
            if not reply.active or not reply.staged:
                raise RuntimeError("step on a closed reply or outside a segment")
            if reply.length >= self.kv.positions:
                raise RuntimeError(f"TTS reply row {reply.row} is full ({reply.length} positions)")
        rows = max(r.row for r in replies) + 1
        bucket = self.graphs.bucket(rows)
        ints, temp, draws = self._ints.host, self._temperature.host, self._draws.host
        ints[:, :bucket] = 0
        ints[0, :bucket] = self.kv.scratch_position
        temp[:bucket] = 0.0
        draws[:, :bucket] = 0
        codebooks = self._codebook_ids
        for reply in replies:
            ints[:, reply.row] = (reply.length, reply.stop_at_eos)
            temp[reply.row] = self.sampling.temperature
            draws[:, reply.row] = draw_key(reply.seed, reply.drawn * len(codebooks) + codebooks)
            if self.on_frame is not None:
                self.on_frame(self.frames_generated)
        self._ints.push(bucket)
        self._temperature.push(bucket)
        self._draws.push(bucket)
        self.graphs.run(rows, max(r.length for r in replies) + 1)
        return FrameLaunch(list(replies), self._readback.queue(self._out, bucket))

    def collect_frames(self, launched: FrameLaunch) -> np.ndarray:
        """The codes and audio of the frame step launched (``[slots, K + frame_size]``), after one wait
        for the device and one read of the host table: the tick's one host sync."""
        return self._readback.read(launched.end).numpy()

    def book_frames(self, replies: Sequence[Reply], out: np.ndarray) -> list[Step]:
        """Commit a frame step's codes and audio into ``replies`` (those it stepped); each one's
        :class:`Step`."""
        import torch

        k = self.num_codebooks
        steps: list[Step] = []
        for reply in replies:  # commit only once the whole step ran
            codes = out[reply.row, :k]
            frame = torch.from_numpy(codes.astype(np.int64))
            reply.length += 1
            reply.drawn += 1
            self.frames_generated += 1
            segment = reply.segment
            assert segment is not None
            eos = reply.stop_at_eos and not codes.any()
            if not eos:
                segment.frames.append(frame)
                reply.frames.append(frame)
                reply.audio.append(out[reply.row, k:].copy())
            done = eos or len(segment.frames) >= reply.max_frames
            if done:
                reply.history.append(segment)
                reply.segment = None
                reply.ended_at_limit = not eos
            pcm = None
            if reply.audio and (done or len(reply.audio) >= reply.chunk_frames):
                pcm, reply.audio = np.concatenate(reply.audio), []
            steps.append(Step(pcm=pcm, segment_frames=len(segment.frames), done=done))
        return steps

    def step(self, reply: Reply) -> Step:
        """One frame of one reply (the batched step with one row)."""
        return self.step_frames([reply])[0]

    def _lap(self, stage: str | None, start: float) -> float:
        """With ``stage_seconds`` set (benchmarks, eager steps only: a captured step is one replay), add
        the time since ``start`` to ``stage``."""
        if self.stage_seconds is None:
            return start
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if stage is not None:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + now - start
        return now

    def _prepare(self, b: int) -> None:
        """Harmless inputs for rows ``0..b-1``: every row writes only its scratch column."""
        self._ints.buffer[:, :b] = 0
        self._ints.buffer[0, :b] = self.kv.scratch_position
        self._temperature.buffer[:b] = 1.0
        self._draws.buffer[:, :b] = 0

    def capture(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile the fused layers (CUDA), then warm up and capture the frame step for every bucket
        (CUDA with graphs on; else nothing)."""
        import torch

        saved = self._inputs.clone()

        def capture() -> None:
            with torch.inference_mode():
                if self.graphs.compiled:  # text and voice prefills, into the scratch row
                    fusion.warm_prefills(self.backbone, self.kv, progress, "tts")
                self.graphs.capture(self._prepare, progress)
                self.segment_graphs.capture(self._segment_meta.prepare, progress)
                self._inputs.copy_(saved)

        def eager() -> None:
            self.backbone.layer_fn, self.depth.layer_fn, self._race = self.backbone.layer, self.depth.layer, race
            self.graphs.compiled = False
            self.graphs.reset()
            self.segment_graphs.reset()
            self._inputs.copy_(saved)

        self.graphs.compiled = fusion.with_fallback(capture, eager, self.graphs.compiled, progress, "tts")

    def ops_per_step(self, bucket: int = 1) -> int:
        """Kernels one frame step of ``bucket`` rows launches (eager; :mod:`duplex.engine.opcount`)."""
        saved, compiled = self._inputs.clone(), self._race
        self._race = race
        try:
            with fusion.eager_layers(self.backbone, self.depth):
                return self.graphs.ops(self._prepare, bucket)
        finally:
            self._inputs.copy_(saved)
            self._race = compiled

    def step_bytes(self, rows: int, length: int) -> int:
        """Bytes a frame step of ``rows`` rows attending over ``length`` positions must read: the
        backbone's weights once, the depth decoder's once per depth step (K - 1 of them), the codebook
        heads, the codec's decoder and quantizer (the step decodes its frame), and each row's backbone K/V."""
        from duplex.engine.roofline import weight_bytes

        m = self.model
        backbone = weight_bytes(m.backbone_model.layers, m.lm_head)
        depth = weight_bytes(m.depth_decoder.model.layers) * (self.num_codebooks - 1)
        heads = self.codebook_heads.numel() * self.codebook_heads.element_size()
        codec = weight_bytes(m.codec_model.decoder, m.codec_model.quantizer)
        kv = self.kv.slot_nbytes() * min(length, self.kv.columns) // self.kv.columns
        return backbone + depth + heads + codec + rows * kv
