"""The streaming ASR stage: one NeMo cache-aware model serving many sessions through one batch worker.

:class:`StreamingASR` (the :class:`~duplex.stages.ASRModel`) owns the model, its chunk plan, the
cache slots and a :class:`~duplex.engine.scheduler.Scheduler`. :class:`ASRSession` (the
:class:`~duplex.stages.ASRStream`) buffers a session's audio on the event loop and, whenever a full
chunk is there, submits its state to the worker; the worker gathers every session with a chunk
ready and runs one step for all of them (exact log-mel frames, subsampling, conformer layers with
cache slots, greedy decoding), and the session turns the tokens into partial and final events.

The worker alone touches model tensors and session state during a step; a session never has more
than one step in flight (a lock), and a step already handed to the worker always lands before the
session goes on, even if the caller is cancelled, so the state never tears.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from duplex.audio import to_mono_float
from duplex.clock import now
from duplex.errors import ConfigError
from duplex.events import INPUT_RATE, TranscriptFinal, TranscriptPartial
from duplex.engine.graphs import BucketedStep, buckets_for
from duplex.engine.scheduler import CLOCK_S, Scheduler
from duplex.engine.slots import SlotPool
from duplex.asr.decoding import Commit, CTCGreedy, RNNTGreedy, Tokens
from duplex.asr import kv_encoder
from duplex.asr.encoder import ChunkPlan, NemoLayers, check_cache_aware, pre_encode, select_context
from duplex.asr.frontend import AudioBuffer, MelSpec, frame_segment, log_mel
from duplex.asr.transcript import FrameTiming, Utterance
from duplex.asr.vocab import Vocabulary

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Labels per second of audio that the captured decoding of a steady chunk makes room for, beyond one
# label step per encoder frame (and room for at least MIN_LABEL_ROOM): speech gives 0.2-0.4 labels
# per 80 ms frame, 2.5-5 a second, so a chunk rarely needs more. A chunk that emits more is
# decoded again by the frame-looping static decoding (a second captured step, and a second host
# sync that tick), so the tokens never depend on the room.
LABELS_PER_SECOND = 18.0
MIN_LABEL_ROOM = 3

@dataclass(eq=False)
class SessionState:
    """What one session's stream must keep between chunks (mutated only by the worker in a step)."""

    slot: int  # its row in the encoder cache pool and the decoder state
    audio: AudioBuffer = field(default_factory=AudioBuffer.empty)
    n_chunks: int = 0  # chunks encoded
    n_mel: int = 0  # mel frames consumed by those chunks
    n_enc: int = 0  # encoder frames produced
    mel_cache: torch.Tensor | None = None  # [n_mels, <= pre_cache] float32: the last mel frames
    skip_until: int = 0  # encoder frames before this were decoded provisionally by a flush: skip them
    fresh: bool = True  # its slot still holds the previous owner's state
    encoded: list[torch.Tensor] | None = None  # when a list: every chunk's encoder output [D, T] (tests)


@dataclass(frozen=True)
class _SteadyStep:
    """What the steady step of one bucket made (tensors a graph replay refills in place)."""

    encoded: torch.Tensor  # [B, D, out]
    encoder: Commit  # advances the encoder caches of the rows
    labels: torch.Tensor | None  # RNNT: RNNTGreedy.loop_labels' [B, 2 * steps + 1] if looped, else
    # RNNTGreedy.labels' [B, out, max_symbols] (-1 where none)
    decoder: Commit | None  # advances the decoding state of the rows (RNNT)
    looped: bool = False


@dataclass(frozen=True)
class StepResult:
    tokens: Tokens  # (encoder frame since stream start, token id)
    horizon: int  # input samples the result depends on


class StreamingASR:
    """A cache-aware streaming FastConformer (NeMo) serving any number of sessions.

    Several instances may share one NeMo model (say, one per latency in a benchmark) as long as
    they do not step at the same time: each sets the encoder's attention context before its step.
    """

    def __init__(self, model, *, context: tuple[int, int], device: str = "cpu", decoder: str | None = None,
                 max_batch: int = 32, fast: bool = True, name: str = "asr", graphs: bool = True,
                 label_steps: int | None = None) -> None:
        import torch

        check_cache_aware(model)
        self.device = device
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model.to(device).eval()
        for part, child in model.named_children():  # the front end stays float32 (its filterbank too)
            if part != "preprocessor":
                child.to(self.dtype)
        self.nemo = model
        self.spec = MelSpec.from_nemo(model.preprocessor).to(device)
        self.plan: ChunkPlan = select_context(model, context)
        if self.spec.sample_rate != INPUT_RATE:
            raise ConfigError(f"the ASR model expects {self.spec.sample_rate} Hz audio; duplex feeds "
                              f"{INPUT_RATE} Hz")
        self.vocab = Vocabulary.from_nemo(model)
        self.timing = FrameTiming(self.plan.factor, self.spec.hop)
        self.head = self._pick_head(model, decoder)
        capacity = max(1, max_batch)
        # the cached-keys step (kv_encoder) where the encoder allows it, else NeMo's own
        self.fast = fast and kv_encoder.supported(model.encoder)
        layers = kv_encoder.KVEncoder if self.fast else NemoLayers
        with torch.no_grad():
            # one slot more than the batch: the scratch slot, which padding rows of a captured step use
            self.layers = layers(model.encoder, self.plan, capacity + 1, device, self.dtype)
            self.decoder = self._make_decoder(model, capacity + 1)
        self._scratch = capacity
        # A session's later chunks (every chunk once its pre-encode cache is full) have one shape: their
        # subsampling and conformer layers are one step per batch bucket, captured as CUDA graphs on a
        # GPU (duplex.engine.graphs); first chunks run the same code eagerly.
        self.graphs = BucketedStep(f"{name} encoder", self._encode_fn, buckets_for(capacity), (1,), device=device,
                                   graphs=graphs)
        self._mel_in = torch.zeros(capacity, self.spec.n_mels, self.plan.pre_cache + self.plan.mel, device=device)
        self._slots_in = torch.full((capacity,), self._scratch, dtype=torch.int64, device=device)
        self._valid_in = torch.zeros(capacity, self.plan.out, dtype=torch.bool, device=device)
        # the steady step's encoder output, kept where both decoding steps read it
        self._encoded_out = torch.zeros(capacity, int(model.encoder._feat_out), self.plan.out, dtype=self.dtype,
                                        device=device)
        self._encoded: dict[int, _SteadyStep] = {}  # per bucket: what its step made
        # The captured step decodes a steady chunk in `label_steps` label steps, one per frame and
        # room for LABELS_PER_SECOND (RNNTGreedy.loop_labels); a chunk with more labels is decoded
        # again, frame by frame, by the second captured step (`redecode`, per bucket).
        full = self.plan.out * getattr(self.decoder, "max_symbols", 1)
        if label_steps is None:
            label_steps = self.plan.out + max(MIN_LABEL_ROOM, math.ceil(LABELS_PER_SECOND * self.chunk_seconds))
        if label_steps < 1:
            raise ConfigError(f"label_steps must be >= 1, got {label_steps}")
        self.label_steps = min(label_steps, full)
        self.redecode = BucketedStep(f"{name} decoding", self._redecode_fn, buckets_for(capacity), (1,),
                                     device=device, graphs=graphs)
        self._redecoded: dict[int, tuple[torch.Tensor, Commit]] = {}  # per bucket: what its step made
        self.steady_steps = 0  # steady steps decoded in the captured step, and of them those decoded again
        self.redecoded = 0
        # An endpoint's flush (the audio after a stream's last chunk, encoded provisionally and decoded)
        # is on the path from the end of speech to the final transcript: captured per number of
        # encoder frames (1 .. the caches' room) at batch 1, its decoding looping over labels as the
        # steady step's does (RNNT heads and the cached-keys encoder; others flush eagerly).
        self._flush_room = self.label_steps - self.plan.out  # label steps beyond one per frame
        self.flushes = BucketedStep(f"{name} flush", self._flush_fn, (1,), self._flush_lengths(), device=device,
                                    graphs=graphs)
        # a flush with more labels than that is decoded again, frame by frame (a second captured step
        # per length, reading the first one's encoder output from a static buffer)
        self.flushes_again = BucketedStep(f"{name} flush decoding", self._flush_again_fn, (1,),
                                          self._flush_lengths(), device=device, graphs=graphs)
        room = max(self.layers.pool.room if isinstance(self.layers, kv_encoder.KVEncoder) else 0, 1)
        self._flush_x = torch.zeros(1, room, int(model.encoder.d_model), dtype=self.dtype, device=device)
        self._flush_slot = torch.full((1,), self._scratch, dtype=torch.int64, device=device)
        self._flush_valid = torch.zeros(1, room, dtype=torch.bool, device=device)
        self._flush_encoded = torch.zeros(1, int(model.encoder._feat_out), room, dtype=self.dtype, device=device)
        self._flushed: dict[int, torch.Tensor] = {}  # per length: the labels of its step, and of its second
        self._flushed_again: dict[int, torch.Tensor] = {}
        self.captured_flushes = 0  # flushes decoded by their captured step, and of them those decoded again
        self.flushes_decoded_again = 0
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # the worker thread runs on a stream of its own
        # The step commits every session's state only once the whole batch has run, so the scheduler
        # re-runs a failed batch row by row and only the failing session gets the error.
        # On the engines' 20 ms clock (duplex.engine.scheduler): the chunks of many sessions that
        # complete within one block step together.
        self._batch: Scheduler[SessionState, StepResult] = Scheduler(name, self._step, device=device,
                                                                     max_batch=max_batch, clock=CLOCK_S)
        # session rows of the encoder caches and decoder states; they grow past the batch (eager
        # then), never onto the scratch row
        self.rows = SlotPool("ASR stream slots", None, reserved=(self._scratch,))

    # -- construction helpers ----------------------------------------------------------------------

    @staticmethod
    def _pick_head(model, decoder: str | None) -> str:
        has_rnnt = hasattr(model, "joint")
        has_ctc = hasattr(model, "ctc_decoder") or not has_rnnt
        default = getattr(model, "cur_decoder", "rnnt" if has_rnnt else "ctc")
        head = decoder or default
        if head not in ("rnnt", "ctc") or (head == "rnnt" and not has_rnnt) or (head == "ctc" and not has_ctc):
            heads = [h for h, ok in (("rnnt", has_rnnt), ("ctc", has_ctc)) if ok]
            raise ConfigError(f"the ASR model has no {head!r} decoder; it has: {', '.join(heads)}")
        return head

    def _make_decoder(self, model, capacity: int) -> RNNTGreedy | CTCGreedy:
        if self.head == "rnnt":
            greedy = model.cfg.get("decoding", {}).get("greedy", {}) or {}
            return RNNTGreedy(model.decoder, model.joint, max_symbols=int(greedy.get("max_symbols", 10) or 10),
                              reset_ids=self.vocab.end_ids, capacity=capacity, device=self.device,
                              dtype=self.dtype)
        ctc = model.ctc_decoder if hasattr(model, "ctc_decoder") else model.decoder
        return CTCGreedy(ctc, blank=len(self.vocab.texts), reset_ids=self.vocab.end_ids, capacity=capacity)

    # -- the ASRModel contract ------------------------------------------------------------------------

    @property
    def context(self) -> tuple[int, int]:
        return self.plan.context

    @property
    def chunk_seconds(self) -> float:
        """Audio per chunk (after the first): the step period of a live stream."""
        return self.plan.mel * self.spec.hop / INPUT_RATE

    def new_stream(self) -> ASRSession:
        return ASRSession(self)

    async def aclose(self) -> None:
        await self._batch.aclose()

    def close(self) -> None:
        self._batch.close()

    @property
    def scheduler(self) -> Scheduler[SessionState, StepResult]:
        """The engine's scheduler (its tick history: tests and benchmarks)."""
        return self._batch

    def chunk_ready(self, state: SessionState) -> bool:
        """Whether ``state`` has the audio for its next chunk (plain arithmetic)."""
        needed = self.plan.mel_for_chunks(state.n_chunks + 1)
        return self.spec.frames_ready(state.audio.fed) >= needed

    def samples_short(self, state: SessionState) -> int:
        """Input samples ``state`` still needs before its next chunk is ready (0 once it is)."""
        return max(0, self.spec.samples_needed(self.plan.mel_for_chunks(state.n_chunks + 1)) - state.audio.fed)

    def submit(self, state: SessionState, *, behind: bool = False) -> Awaitable[StepResult]:
        """The next chunk of ``state``, stepped with the other sessions' on the engines' clock;
        ``behind`` (its stream has more chunks waiting): at the next tick, whatever the clock."""
        return self._batch.submit(state, key=state, now=behind)

    def flush(self, state: SessionState) -> Awaitable[StepResult]:
        return self._batch.run(self._flush, state)

    # -- worker thread ------------------------------------------------------------------------------

    def _prepare(self, states: Sequence[SessionState]) -> None:
        import torch

        encoder = self.nemo.encoder
        if tuple(encoder.att_context_size) != self.plan.context:  # another StreamingASR shares the model
            encoder.set_default_att_context_size(list(self.plan.context))
        top = max(s.slot for s in states) + 1
        if top > self.layers.pool.capacity and self.graphs.captured:
            # the pools move: the captured steps would read the old ones
            log.warning("%d ASR sessions at once exceed the %d the encoder step was captured for; it runs "
                        "eagerly from now on", top, self._scratch)
            for step in (self.graphs, self.redecode, self.flushes, self.flushes_again):
                step.reset()
                step.graphs_enabled = False
        self.layers.pool.grow(top)
        self.decoder.grow(top)
        fresh = [s for s in states if s.fresh]
        if fresh:
            slots = torch.tensor([s.slot for s in fresh], dtype=torch.int64, device=self.device)
            self.layers.pool.reset(slots)
            self.decoder.reset(slots)
            for s in fresh:
                s.fresh = False

    def _new_mel(self, states: Sequence[SessionState], counts: Sequence[int]) -> list[torch.Tensor]:
        """The next ``counts[i]`` log-mel frames of each session, [n_mels, count] float32 (the
        sessions' state is not touched: :meth:`_step` commits it)."""
        import torch

        out: list[torch.Tensor | None] = [None] * len(states)
        for n in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == n]
            segs = np.stack([frame_segment(self.spec, states[i].audio, states[i].n_mel, states[i].n_mel + n)
                             for i in idx])
            mel = log_mel(self.spec, torch.from_numpy(segs).to(self.device))  # [G, n_mels, n]
            for j, i in enumerate(idx):
                out[i] = mel[j]
        return out  # type: ignore[return-value]

    def _subsample(self, states: Sequence[SessionState],
                   mels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pre-encode each session's new mel frames, with its pre-encode cache: [T', d_model] each,
        and each session's next pre-encode cache (for :meth:`_step` to commit).

        With a full cache (``pre_cache`` frames) the first ``drop`` outputs are dropped. Before the
        stream has that many frames (only the second chunk at [70,0]), the input starts at the
        stream's first frame, so the subsampling's own left padding is the offline one, and the
        outputs already produced are dropped instead: zero mel frames would not be equivalent.
        """
        import torch

        inputs, drops, caches = [], [], []
        for s, mel in zip(states, mels):
            cache = s.mel_cache
            x = mel if cache is None else torch.cat([cache, mel], dim=1)
            full = cache is not None and cache.size(1) == self.plan.pre_cache
            inputs.append(x)
            drops.append(self.plan.drop if full else s.n_enc)
            caches.append(x[:, -self.plan.pre_cache:].clone())
        out: list[torch.Tensor | None] = [None] * len(states)
        for key in sorted(set(zip((x.size(1) for x in inputs), drops))):
            idx = [i for i, x in enumerate(inputs) if (x.size(1), drops[i]) == key]
            batch = torch.stack([inputs[i] for i in idx]).to(self.dtype)
            pre = pre_encode(self.nemo.encoder, self.plan, batch, first=True)[:, key[1]:]
            for j, i in enumerate(idx):
                out[i] = pre[j]
        return out, caches  # type: ignore[return-value]

    def _valid(self, states: Sequence[SessionState], frames: int) -> torch.Tensor:
        import torch

        start = torch.tensor([s.n_enc - s.skip_until for s in states], device=self.device)
        return (start.unsqueeze(1) + torch.arange(frames, device=self.device)) >= 0  # [B, T]

    def _step(self, states: Sequence[SessionState]) -> list[StepResult]:
        """One chunk for every session in ``states`` (each has one ready): the batched hot step.

        Nothing of any session changes until the whole batch has been computed (caches, decoding
        state, mel position, audio kept), so a batch that raises can be re-run row by row exactly,
        and only the session that fails alone gets the error."""
        import torch

        with torch.no_grad():
            self._prepare(states)
            counts = [self.plan.first_mel if s.n_chunks == 0 else self.plan.mel for s in states]
            mels = self._new_mel(states, counts)
            steady = [i for i, s in enumerate(states) if self._steady(s)]
            others = [i for i in range(len(states)) if i not in set(steady)]
            rows: list[torch.Tensor | None] = [None] * len(states)  # each session's encoder output [D, out]
            mel_caches: list[torch.Tensor | None] = [None] * len(states)
            tokens: list[Tokens | None] = [None] * len(states)
            commits: list[Commit] = []
            if steady:  # one shape: the (captured) step of a bucket, decoding included for RNNT heads
                encoded, done, caches, found = self._encode_steady([states[i] for i in steady],
                                                                   [mels[i] for i in steady])
                commits += done
                for j, i in enumerate(steady):
                    rows[i], mel_caches[i] = encoded[j], caches[j]
                    if found is not None:
                        tokens[i] = found[j]
            if others:
                pre, caches = self._subsample([states[i] for i in others], [mels[i] for i in others])
                slots = torch.tensor([states[i].slot for i in others], dtype=torch.int64, device=self.device)
                encoded, commit = self.layers.encode(torch.stack(pre), slots)  # [B, D, out]
                commits.append(commit)
                for j, i in enumerate(others):
                    rows[i], mel_caches[i] = encoded[j], caches[j]
            undecoded = [i for i, t in enumerate(tokens) if t is None]
            if undecoded:
                encoded = torch.stack([rows[i] for i in undecoded])  # type: ignore[misc]  # [B, D, out]
                slots = torch.tensor([states[i].slot for i in undecoded], dtype=torch.int64, device=self.device)
                found, commit = self.decoder.decode(encoded, slots,
                                                    self._valid([states[i] for i in undecoded], encoded.size(2)))
                commits.append(commit)
                for j, i in enumerate(undecoded):
                    tokens[i] = found[j]
            kept = {b: rows[b].to("cpu", torch.float32, copy=True)  # type: ignore[union-attr]
                    for b, s in enumerate(states) if s.encoded is not None}  # a steady row is a view of a buffer
            # the batch succeeded: commit every session's state
            for commit in commits:
                commit()
            results = []
            for b, (s, n, cache) in enumerate(zip(states, counts, mel_caches)):
                s.n_mel += n
                s.audio.drop_before(self.spec.first_sample(s.n_mel) - 1)
                s.mel_cache = cache
                if s.encoded is not None:
                    s.encoded.append(kept[b])
                results.append(StepResult([(s.n_enc + t, k) for t, k in tokens[b]],  # type: ignore[union-attr]
                                          min(s.audio.fed, self.spec.samples_needed(s.n_mel))))
                s.n_enc += self.plan.out
                s.n_chunks += 1
            return results

    def _steady(self, state: SessionState) -> bool:
        """Whether ``state``'s next chunk has the steady shape: a later chunk after a full pre-encode cache."""
        return state.mel_cache is not None and state.mel_cache.size(1) == self.plan.pre_cache

    def _encode_steady(self, states: Sequence[SessionState], mels: Sequence[torch.Tensor]
                       ) -> tuple[torch.Tensor, list[Commit], list[torch.Tensor], list[Tokens] | None]:
        """Steady chunks of ``states`` through the step of their batch bucket (a graph replay on a GPU):
        their encoder output [B, D, out], the commits of their encoder caches and decoding state,
        their next pre-encode caches (for :meth:`_step` to commit) and, for an RNNT head, their tokens
        (decoded inside the step; None: decode them after it)."""
        import torch

        n = len(states)
        bucket = self.graphs.bucket(n)
        inputs = [torch.cat([s.mel_cache, mel], dim=1) for s, mel in zip(states, mels)]  # type: ignore[list-item]
        self._mel_in[:n] = torch.stack(inputs)
        slots = [s.slot for s in states] + [self._scratch] * (bucket - n)  # padding rows: the scratch slot
        self._slots_in[:bucket] = torch.tensor(slots, dtype=torch.int64)
        self._valid_in[:n] = self._valid(states, self.plan.out)
        self._valid_in[n:bucket] = False
        self.graphs.run(n, 1)
        step = self._encoded[bucket]
        commits = [step.encoder]
        found: list[Tokens] | None = None
        if step.labels is not None and step.decoder is not None:
            if not step.looped:
                found = RNNTGreedy.tokens(step.labels[:n])  # the step's one host sync
                commits.append(step.decoder)
            else:
                looped = RNNTGreedy.loop_tokens(step.labels[:n])  # the step's one host sync
                self.steady_steps += 1
                if all(tokens is not None for tokens in looped):
                    found = looped  # type: ignore[assignment]
                    commits.append(step.decoder)
                else:  # more labels than the loop's steps: every frame's every label step, exactly
                    self.redecoded += 1
                    self.redecode.run(n, 1)
                    labels, decoder = self._redecoded[bucket]
                    found = RNNTGreedy.tokens(labels[:n])  # a second sync, for this step only
                    commits.append(decoder)
        return step.encoded[:n], commits, [x[:, -self.plan.pre_cache:].clone() for x in inputs], found

    def _encode_fn(self, b: int, length: int) -> None:
        """The captured step of bucket ``b``: subsample, encode and (RNNT) decode the steady chunks in
        the static inputs (rows ``0..b-1``; padding rows read and write the scratch slot); its outputs
        and commits are kept for :meth:`_encode_steady` (a replay refills the same tensors)."""
        x = pre_encode(self.nemo.encoder, self.plan, self._mel_in[:b].to(self.dtype), first=True)[:, self.plan.drop:]
        slots = self._slots_in[:b]
        encoded, encoder = self.layers.encode(x, slots)
        labels, decoder, looped = None, None, False
        if isinstance(self.decoder, RNNTGreedy):
            # captured (or rehearsed for a check), a fixed number of label steps that loop over labels;
            # eager, frame by frame, each frame stopping at its first blank (a host sync a label step)
            looped = self.graphs.graphs_enabled or self.graphs.rehearse
            if looped:
                encoded = self._encoded_out[:b].copy_(encoded)  # where the decoding again reads it (one small copy)
                labels, decoder = self.decoder.loop_labels(encoded, slots, self._valid_in[:b], self.label_steps)
            else:
                labels, decoder = self.decoder.labels(encoded, slots, self._valid_in[:b], static=False)
        self._encoded[b] = _SteadyStep(encoded, encoder, labels, decoder, looped)

    def _redecode_fn(self, b: int, length: int) -> None:
        """The second captured step of bucket ``b``: the steady step's encoder output decoded again with
        every label step of every frame (:meth:`RNNTGreedy.labels`, static), for a chunk that emitted
        more labels than the first step's loop makes room for."""
        assert isinstance(self.decoder, RNNTGreedy)
        self._redecoded[b] = self.decoder.labels(self._encoded_out[:b], self._slots_in[:b], self._valid_in[:b],
                                                 static=True)

    def _flush_lengths(self) -> tuple[int, ...]:
        """The flush lengths (encoder frames) captured: every one the cached-keys encoder takes, for an
        RNNT head; none otherwise (the flush then runs eagerly, as on the CPU)."""
        if not (isinstance(self.layers, kv_encoder.KVEncoder) and isinstance(self.decoder, RNNTGreedy)):
            return ()
        return tuple(range(1, self.layers.pool.room + 1))

    def _flush_captured(self, frames: int) -> bool:
        """Whether a flush of ``frames`` encoder frames runs its captured step (or its rehearsal; not when
        a benchmark sets ``flushes.eager`` to compare with the eager flush)."""
        return (frames in self.flushes.lengths  # (none but for an RNNT head on the cached-keys encoder)
                and (self.flushes.captured or self.flushes.rehearse) and not self.flushes.eager)

    def flush_label_steps(self, frames: int) -> int:
        """Label steps of the captured flush of ``frames`` encoder frames: one per frame and the steady
        step's room for labels, in proportion to the frames (at least ``MIN_LABEL_ROOM``, or the
        steady room if less; at most every label step of every frame)."""
        assert isinstance(self.decoder, RNNTGreedy)
        room = max(min(MIN_LABEL_ROOM, self._flush_room), math.ceil(self._flush_room * frames / self.plan.out))
        return max(1, min(frames + room, frames * self.decoder.max_symbols))

    def _flush_fn(self, b: int, frames: int) -> None:
        """The captured flush of ``frames`` encoder frames (batch 1): the static frames encoded from the
        stream's caches (nothing committed) and decoded from its decoding state by label looping; the
        encoder output and the labels are kept for :meth:`_flush` (a replay refills the same tensors)."""
        assert isinstance(self.decoder, RNNTGreedy)
        encoded, _ = self.layers.encode(self._flush_x[:, :frames], self._flush_slot)  # provisional
        encoded = self._flush_encoded[:, :, :frames].copy_(encoded)  # where the decoding again reads it
        labels, _ = self.decoder.loop_labels(encoded, self._flush_slot, self._flush_valid[:, :frames],
                                             self.flush_label_steps(frames))
        self._flushed[frames] = labels

    def _flush_again_fn(self, b: int, frames: int) -> None:
        """The second captured flush step of ``frames`` frames: the first one's encoder output decoded
        again with every label step of every frame (:meth:`RNNTGreedy.labels`, static), for a flush that
        emitted more labels than the first one's label steps make room for."""
        assert isinstance(self.decoder, RNNTGreedy)
        self._flushed_again[frames], _ = self.decoder.labels(
            self._flush_encoded[:, :, :frames], self._flush_slot, self._flush_valid[:, :frames], static=True)

    def _prepare_flush(self, b: int) -> None:
        """Harmless inputs for the flush step: no frames valid, on the scratch slot."""
        self._flush_x.zero_()
        self._flush_slot.fill_(self._scratch)
        self._flush_valid.fill_(False)

    def ops_per_flush(self, frames: int) -> int:
        """Kernels the captured flush of ``frames`` encoder frames launches (as a GPU captures it), counted
        eagerly; call it after :meth:`warm_up`."""
        import torch

        made = dict(self._flushed)  # a captured length's outputs are the tensors its replays refill: kept
        try:
            with torch.no_grad():
                return self.flushes.ops(self._prepare_flush, 1, frames)
        finally:
            self._flushed = made

    async def warm_up(self, progress: Callable[[str], None] | None = None) -> None:
        """Capture the steady encoder step for every batch bucket (CUDA graphs; nothing on the CPU),
        on the engine's own thread, before the first session needs it."""
        await self._batch.run(self._capture, progress)

    def _prepare_step(self, b: int) -> None:
        """Harmless inputs for rows ``0..b-1`` of the steady step: silence, on the scratch slot (a
        capture, or a count, touches no session's cache)."""
        self._mel_in[:b] = 0.0
        self._slots_in[:b] = self._scratch
        self._valid_in[:b] = False

    def ops_per_step(self, bucket: int = 1) -> int:
        """Kernels one steady step of ``bucket`` streams launches as a GPU captures it (the static
        decoding: every label step of every frame), counted eagerly by :mod:`duplex.engine.opcount`.
        Call it after :meth:`warm_up` (which makes what the step only reads)."""
        import torch

        rehearse, self.graphs.rehearse = self.graphs.rehearse, True  # the captured decoding, not the eager one
        made = dict(self._encoded)  # a captured bucket's outputs are the tensors its replays refill: kept
        try:
            with torch.no_grad():
                return self.graphs.ops(self._prepare_step, bucket)
        finally:
            self.graphs.rehearse = rehearse
            self._encoded = made

    def _capture(self, progress: Callable[[str], None] | None) -> None:
        import torch

        prepare = self._prepare_step
        with torch.no_grad():
            if isinstance(self.layers, kv_encoder.KVEncoder):  # what the steady step makes once, made before any capture
                prepare(1)
                steady = pre_encode(self.nemo.encoder, self.plan, self._mel_in[:1].to(self.dtype), first=True)
                self.layers.prepare(steady[:, self.plan.drop:])
            steps = [(self.graphs, prepare)]
            if isinstance(self.decoder, RNNTGreedy) and self.label_steps < self.plan.out * self.decoder.max_symbols:
                steps.append((self.redecode, prepare))  # a chunk may emit more labels than the loop's steps
            try:
                for step, ready in steps:  # the decoding again reads what the steady step wrote: captured after it
                    step.rehearse = self.graphs.rehearse
                    step.capture(ready, progress)
            except Exception as exc:  # a module that cannot be captured on this machine: run eagerly
                if not self.graphs.graphs_enabled:
                    raise
                log.exception("%s: capturing the steady step failed; it runs eagerly", self.graphs.name)
                if progress is not None:
                    progress(f"{self.graphs.name}: capture failed ({type(exc).__name__}: {exc}); running eagerly")
                for step in (self.graphs, self.redecode, self.flushes, self.flushes_again):
                    step.reset()
                    step.graphs_enabled = False
                return
            if self.flushes.lengths:
                self._capture_flushes(progress)

    def _capture_flushes(self, progress: Callable[[str], None] | None) -> None:
        """Capture the flush of every length (the steady step's capture went well); one that fails
        leaves the flushes eager and the steady step captured."""
        assert isinstance(self.layers, kv_encoder.KVEncoder)
        lengths = []
        for frames in self.flushes.lengths:  # positions and masks of every flush length, made now
            try:
                self.layers.prepare(self._flush_x[:, :frames])
                lengths.append(frames)
            except ValueError:  # an attention context this many frames cannot take: never flushed so
                pass
        self.flushes.lengths = self.flushes_again.lengths = tuple(lengths)
        if not lengths:
            return
        try:
            for step in (self.flushes, self.flushes_again):  # the second reads what the first wrote
                step.rehearse = self.graphs.rehearse
                step.capture(self._prepare_flush, progress)
        except Exception as exc:
            if not self.flushes.graphs_enabled:
                raise
            log.exception("%s: capture failed; endpoints flush eagerly", self.flushes.name)
            if progress is not None:
                progress(f"{self.flushes.name}: capture failed ({type(exc).__name__}: {exc}); flushing eagerly")
            for step in (self.flushes, self.flushes_again):
                step.reset()
                step.graphs_enabled = False

    def _flush(self, state: SessionState) -> StepResult:
        """Decode what the stream holds beyond its last chunk, provisionally, then reset decoding.

        The pending mel frames (padded at the end like the offline signal's end) run through the
        encoder without committing its caches and are decoded from the current decoding state; the
        encoder frames they covered are then skipped when their real chunk arrives, since the
        utterance they belong to is closed.
        """
        import torch

        with torch.no_grad():
            self._prepare([state])
            slots = torch.tensor([state.slot], dtype=torch.int64, device=self.device)
            tokens: Tokens = []
            pending = self.spec.offline_frames(state.audio.fed) - state.n_mel
            if pending > 0:
                mel = self._new_mel([state], [pending])
                x = self._subsample([state], mel)[0][0].unsqueeze(0)
                frames = x.size(1)
                if frames > 0:
                    valid = self._valid([state], frames)
                    found: Tokens | None
                    if self._flush_captured(frames):  # one replay, one host sync
                        self._flush_x[:, :frames] = x
                        self._flush_slot.fill_(state.slot)
                        self._flush_valid[:, :frames] = valid
                        self.flushes.run(1, frames)
                        self.captured_flushes += 1
                        found = RNNTGreedy.loop_tokens(self._flushed[frames])[0]
                        if found is None:  # more labels than its label steps: decoded again, a second sync
                            self.flushes_decoded_again += 1
                            self.flushes_again.run(1, frames)
                            found = RNNTGreedy.tokens(self._flushed_again[frames])[0]
                    else:
                        encoded, _ = self.layers.encode(x, slots)  # provisional: the caches are not advanced
                        found = self.decoder.decode(encoded, slots, valid)[0][0]
                    tokens = [(state.n_enc + t, k) for t, k in found]
                    state.skip_until = max(state.skip_until, state.n_enc + frames)
            self.decoder.reset(slots)
            return StepResult(tokens, state.audio.fed)


class ASRSession:
    """One session's ASR stream (see the module docstring)."""

    def __init__(self, model: StreamingASR) -> None:
        self._model = model
        self.state = SessionState(slot=model.rows.take())
        self._utterance = Utterance()
        self._lock = asyncio.Lock()
        self._closed = False
        self._last_token_frame = -1

    @property
    def samples_fed(self) -> int:
        return self.state.audio.fed

    def samples_short(self) -> int:
        """Samples still missing before a feed steps the next chunk (after a feed, at least 1)."""
        return max(1, self._model.samples_short(self.state))

    @property
    def trailing_blank_s(self) -> float:
        """Seconds of audio decoded since the model last emitted a token (its own blank history): a
        turn policy can weigh it with the VAD's silence before trusting that the words are over."""
        frames = max(0, self.state.n_enc - 1 - self._last_token_frame)
        return frames * self._model.timing.factor * self._model.timing.hop / INPUT_RATE

    async def feed(self, pcm: np.ndarray) -> list[TranscriptPartial | TranscriptFinal]:
        """Consume the next 16 kHz samples; return the partials and EOU finals they produced."""
        pcm = to_mono_float(np.asarray(pcm), INPUT_RATE)  # checks shape/type, zeroes NaN, clips
        async with self._lock:
            if self._closed:
                raise RuntimeError("feed() on a closed ASR stream")
            if pcm.size:
                self.state.audio.append(pcm)
            events: list[TranscriptPartial | TranscriptFinal] = []
            behind = False
            while self._model.chunk_ready(self.state):
                result = await self._land(self._model.submit(self.state, behind=behind))
                behind = True  # a second chunk in one feed: this stream is catching up
                events.extend(self._absorb(result, partial=True))
            return events

    async def endpoint(self) -> list[TranscriptFinal]:
        """End the current utterance now (the VAD heard its end): its final, then a clean decoder."""
        async with self._lock:
            if self._closed:
                return []
            result = await self._land(self._model.flush(self.state))
            finals = [e for e in self._absorb(result, partial=False) if isinstance(e, TranscriptFinal)]
            final = self._utterance.final(self._model.vocab, self._model.timing, stream_samples=result.horizon,
                                          wall=now())
            return finals + ([final] if final else [])

    async def aclose(self) -> None:
        async with self._lock:
            if not self._closed:
                self._closed = True
                self._model.rows.give(self.state.slot)

    async def _land(self, job: Awaitable[StepResult]) -> StepResult:
        """Await a worker job. If the caller is cancelled meanwhile, the job (which may already be
        running on this session's state) still lands first, and its tokens join the utterance, so
        the decoder state and the transcript stay in step; then the cancellation goes on."""
        task = asyncio.ensure_future(job)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None:
                self._absorb(task.result(), partial=False)
            raise

    def _absorb(self, result: StepResult, *, partial: bool) -> list[TranscriptPartial | TranscriptFinal]:
        vocab, timing, utt = self._model.vocab, self._model.timing, self._utterance
        events: list[TranscriptPartial | TranscriptFinal] = []
        wall = now()
        for frame, token in result.tokens:
            self._last_token_frame = max(self._last_token_frame, frame)
            if token in vocab.end_ids:
                final = utt.final(vocab, timing, stream_samples=result.horizon, wall=wall, eou=True)
                if final is not None:
                    events.append(final)
            else:
                utt.tokens.append((frame, token))
        if partial:
            event = utt.partial(vocab, timing, stream_samples=result.horizon, wall=wall)
            if event is not None:
                events.append(event)
        return events
