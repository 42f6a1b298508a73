"""Model compute for the dialogue LM: one engine for every session, static shapes, batched decode.

:class:`Engine` owns the model's weights (run through :class:`~duplex.engine.decoder.LeanDecoder`),
the K/V pool with one row per session (each session's attention-sink cache is a
:class:`~duplex.llm.sink_cache.SinkSlot` on its row) and the batched decode step:

- :meth:`Engine.prefill` runs new tokens into one session's row, eager, any length;
  :meth:`Engine.prefill_rows` several sessions' at once (the listens and reply starts of a tick), a
  step over static buffers captured per (batch, tokens) bucket; :meth:`Engine.prefills` whichever
  of the two is cheaper here (where the pass replays: a lone listen or a barge-in's backchannel
  check is one replay, a long catch-up a few, one per piece of the longest bucket).
- :meth:`Engine.decode` runs one token for each of several sessions at once and samples the next
  one inside the step (:mod:`duplex.engine.sampling`, per-row settings and noise). The step's batch
  is the sessions replying, gathered by row index (a session holds its row while it listens, so
  replying rows are rarely ``0..n-1``), padded to a bucket with entries on the scratch row, and
  it attends over a length bucket holding its longest row. Its shapes depend only on the buckets,
  so on CUDA each is one captured graph (:mod:`duplex.engine.graphs`) and a step costs one replay
  and one host sync.
- :meth:`Engine.verdicts`: after a prefill pass, every listen's P(end of message) and every reply
  start's first token, from one step (captured per batch bucket) and one copy back.
- :meth:`Engine.system_block` / :meth:`Engine.keep_system_block`: the K/V and logits of a system
  block (the tokens every cache starts with, its attention sink), kept for the last
  ``SYSTEM_BLOCKS_KEPT`` blocks run, so a new session (or a rebuilt cache) whose system prompt was
  seen before copies them into its row instead of running them (K/V at a position do not depend on
  the row: the copy is exactly what running them there makes).

Everything here is blocking and runs on the LLM's worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from duplex.engine import fusion
from duplex.engine.decoder import LeanDecoder
from duplex.engine.graphs import BucketedStep, buckets_for, lengths_for
from duplex.engine.sampling import sample as sample_rows
from duplex.engine.slots import SlotPool
from duplex.engine.staging import PassRows, Readback, Staged
from duplex.engine.sampling import draw_key, token_keys
from duplex.errors import ConfigError
from duplex.llm.sink_cache import SinkSlot, rope_inv_freq


@dataclass(frozen=True)
class Draw:
    """How one session samples: its settings and the number of draws it made before."""

    temperature: float
    top_p: float
    seed: int
    counter: int
    ban_stop: bool = False  # never end the reply (benchmarks on random weights)


@dataclass(frozen=True)
class DecodeRequest:
    slot: SinkSlot
    token: int  # run this token at position slot.length ...
    draw: Draw  # ... and sample the next one this way


@dataclass(frozen=True)
class Launched:
    """A decode step launched and not yet read: each request's entry (its row), and the step's end."""

    entries: list[int]
    end: Any  # its copy out's end (a CUDA event; None on the CPU, where the copy is done)


PREFILL_LENGTHS = (8, 16, 32, 64)  # tokens per session a captured prefill pass holds (more: in pieces, prefills)
SYSTEM_BLOCKS_KEPT = 8  # system blocks whose K/V new sessions copy (least recently used dropped first)


@dataclass
class _PrefillBuffers:
    """The prefill pass's static inputs and output, one entry per batch position."""

    tokens: Staged  # [T, S] long: entry i's token j at [j, i] (T: the longest tail a pass takes)
    meta: PassRows  # [3, S] long: K/V row, first position, token count
    logits: torch.Tensor  # [S, V] float32: each entry's next-token logits after its last token


@dataclass
class _VerdictBuffers:
    """The verdict step's static inputs and output, one row per batch position."""

    logits: torch.Tensor  # [S, V] float32: the logits each row's verdict reads
    ints: Staged  # [2, S] long: draw key, ban the stop tokens
    floats: Staged  # [2, S] float32: temperature, top_p
    out: torch.Tensor  # [S, 2] float32: P(the estimate's tokens), the token drawn (exact below 2**24)


@dataclass
class _Buffers:
    """The decode step's static inputs and outputs, one entry per batch position (``slots`` of them)."""

    ints: Staged  # [5, S] long: token, position, draw key, ban, K/V row
    floats: Staged  # [2, S] float32: temperature, top_p
    out: torch.Tensor  # [S] long: the sampled tokens
    logits: torch.Tensor  # [S, V] float32


class Engine:
    """A causal LM with RoPE, its K/V pool of ``slots`` sessions of ``window`` positions, and its steps."""

    def __init__(self, model: Any, tokenizer: Any, device: str, *, window: int, slots: int = 4,
                 stop_ids: Sequence[int] = (), graphs: bool = True, compile: bool = False, top_k: int = 50,
                 keep_logits: bool = False) -> None:
        if slots < 1:
            raise ConfigError(f"the LLM engine needs at least one session slot, got {slots}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.inv_freq = rope_inv_freq(model)  # raises ConfigError for models without usable RoPE
        self.num_layers = model.config.num_hidden_layers
        self.dtype = next(model.parameters()).dtype
        # Checkpoints pad their embedding matrix (Qwen2.5: 151936 rows for 151665 tokens): never sample
        # an id the tokenizer cannot turn back into text.
        self.vocab = min(len(tokenizer), model.config.vocab_size)
        self.window = window
        self.slots = slots
        self.top_k = top_k  # candidates a sampled token is drawn from (0: the whole vocabulary, sorted)
        self.keep_logits = keep_logits  # decode steps keep their logits for last_logits() (tests)
        self.decoder = LeanDecoder(model.model, model.config, positions=window)
        self.embed = model.model.embed_tokens.weight  # [V, hidden]
        # the rows of the output layer the tokenizer can name (a view: padded ids are never computed)
        self.lm_head = model.lm_head.weight[: self.vocab]  # [V, hidden]
        bias = getattr(model.lm_head, "bias", None)
        self.lm_bias = None if bias is None else bias[: self.vocab]
        self.kv = self.decoder.new_kv(slots)
        self.rows = SlotPool("LLM session slots", slots)
        self._holders: dict[int, SinkSlot] = {}  # each held row's slot (the slot owns its row number)
        self.moves = 0  # rows moved to pack decode steps (a swap counts once)
        # by the block's token ids: (its K/V, every layer; the next-token logits after it)
        self._systems: OrderedDict[tuple[int, ...], tuple[list[torch.Tensor], torch.Tensor]] = (
            OrderedDict())
        rows = self.vocab
        self._stop = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.set_stop_ids(stop_ids)
        self._keys = token_keys(rows, self.device)
        self._buf = _Buffers(
            ints=Staged((5, slots), torch.long, self.device),  # token, position, draw key, ban, row
            floats=Staged((2, slots), torch.float32, self.device, fill=1.0),
            out=torch.zeros(slots, dtype=torch.long, device=self.device),
            logits=torch.zeros(slots, rows, dtype=torch.float32, device=self.device))
        self._last_step: set[int] = set()  # rows of the latest decode step (each row its batch position)
        # where a launched step leaves its sampled ids (pinned: the copy runs as the step ends)
        self._readback = Readback((slots,), torch.long, self.device)
        self._pre = _PrefillBuffers(
            tokens=Staged((max(window // 2, PREFILL_LENGTHS[-1]), slots), torch.long, self.device),
            meta=PassRows(slots, self.device, self.kv.scratch_row),
            logits=torch.zeros(slots, rows, dtype=torch.float32, device=self.device))
        self._entries = torch.arange(slots, device=self.device)
        # a pass's verdicts (duplex.llm.model): each row's P(end of message) and, for a reply start,
        # its first token drawn by the decode step's sampler, read back together in one copy
        if rows >= 1 << 24:
            raise ConfigError(f"a vocabulary of {rows} tokens: the verdict step carries ids as float32 (< 2**24)")
        self._verdicts = _VerdictBuffers(
            logits=torch.zeros(slots, rows, dtype=torch.float32, device=self.device),
            ints=Staged((2, slots), torch.long, self.device),
            floats=Staged((2, slots), torch.float32, self.device, fill=1.0),
            out=torch.zeros(slots, 2, dtype=torch.float32, device=self.device))
        self._verdict_readback = Readback((slots, 2), torch.float32, self.device)
        self._estimate_ids = torch.zeros(0, dtype=torch.long, device=self.device)  # set_estimate_ids
        self.verdict_graphs = BucketedStep("llm verdicts", self._verdict_fn, buckets_for(slots), (1,),
                                           device=str(self.device), graphs=graphs)
        # attention lengths in powers of two up to the whole window (every column: aligned rows): a
        # step reads the K/V of the batch's longest row, rounded up, not the whole window while the
        # dialogues are young; a sink window, once full, stays full and its steps take the last one
        lengths = (*(n for n in lengths_for(window) if n < window), self.kv.columns)
        self.graphs = BucketedStep("llm decode", self._decode_fn, buckets_for(slots), lengths,
                                   device=str(self.device), graphs=graphs)
        # the prefill pass of several sessions (listens, reply starts), captured per (batch, tokens)
        # bucket; every entry attends over the whole window, so its shapes are the buckets'
        self.prefill_graphs = BucketedStep("llm prefill", self._prefill_fn, buckets_for(slots), PREFILL_LENGTHS,
                                           device=str(self.device), graphs=graphs)
        self.shape_log: list[tuple] | None = None  # tests: the shapes each eager decode step saw
        self._sample = sample_rows
        self.graphs.compiled = fusion.wanted(str(self.device), compile)
        if self.graphs.compiled:  # fused layers and sampler (CUDA); compiled in capture(), at load
            self.decoder.compile()
            self._sample = fusion.compile_fn(sample_rows)

    def set_stop_ids(self, stop_ids: Sequence[int] | frozenset[int]) -> None:
        """The tokens that end a reply (a fixed-length reply never samples them); updated in place,
        so captured steps see the change."""
        self._stop.zero_()
        ids = sorted(int(t) for t in stop_ids if int(t) < self.vocab)  # the others are never sampled anyway
        if ids:
            self._stop[ids] = True

    def set_estimate_ids(self, ids: Sequence[int]) -> None:
        """The tokens whose probability a verdict sums (the end of the user's message), in this order,
        updated in place; their count is part of the verdict step's shapes, so it is set once, at
        load (a chat format's change keeps it: one end-of-message token)."""
        wanted = torch.tensor([int(t) for t in ids], dtype=torch.long, device=self.device)
        if wanted.shape == self._estimate_ids.shape:
            self._estimate_ids.copy_(wanted)
        elif self._estimate_ids.numel() == 0:
            self._estimate_ids = wanted
        else:
            raise RuntimeError(f"the verdict step estimates {self._estimate_ids.numel()} tokens; "
                               f"{wanted.numel()} asked for")

    # -- slots -------------------------------------------------------------------------------------

    def new_slot(self, *, rerotate: bool = True) -> SinkSlot:
        """The lowest free row."""
        slot = SinkSlot(self.kv, self.rows.take(), self.inv_freq, rerotate=rerotate)
        self._holders[slot.row] = slot
        return slot

    def release(self, slot: SinkSlot) -> None:
        self.rows.give(slot.row)
        del self._holders[slot.row]
        slot.length = 0

    def _pack(self, slots: Sequence[SinkSlot]) -> None:
        """Put the ``n`` slots of a decode step on rows ``0..n-1``, so its attention reads their K/V as
        a view of the buffers instead of copying every replying row's K/V in every layer and step:
        a slot on a higher row takes a row below ``n`` that no slot of the step holds, swapping
        contents with the slot there, if any (the positions each holds, every layer). Slots keep
        their rows between steps, so a reply moves once, when it joins the replying rows."""
        n = len(slots)
        stepping = {id(slot) for slot in slots}
        movers = [slot for slot in slots if slot.row >= n]
        if not movers:
            return
        targets = [row for row in range(n) if row not in self._holders or id(self._holders[row]) not in stepping]
        for slot, target in zip(movers, targets):
            old, other = slot.row, self._holders.get(target)
            if other is None:  # a free row: the slot's positions move there
                self.kv.copy_positions(old, target, 0, slot.length)
                self.rows.move(old, target)
                del self._holders[old]
            else:
                self.kv.swap_rows(old, slot.length, target, other.length)
                other.row = old
                self._holders[old] = other
            slot.row = target
            self._holders[target] = slot
            self.moves += 1

    @property
    def free_slots(self) -> int:
        return self.rows.free

    def system_block(self, slot: SinkSlot, ids: Sequence[int]) -> torch.Tensor | None:
        """Put the kept system block ``ids`` at the start of the empty ``slot``; returns the logits
        after it, or None when no block of these tokens is kept (run them, then :meth:`keep_system_block`)."""
        if slot.length:
            raise RuntimeError(f"a system block goes into an empty cache, not one of {slot.length} slots")
        key = tuple(ids)
        kept = self._systems.get(key)
        if kept is None:
            return None
        self._systems.move_to_end(key)
        prefix, logits = kept
        slot.length = self.kv.restore(slot.row, prefix)
        return logits.clone()

    def keep_system_block(self, slot: SinkSlot, ids: Sequence[int], logits: torch.Tensor) -> None:
        """Keep the system block ``ids`` that ``slot`` starts with (just run) and the logits after it."""
        key = tuple(ids)
        self._systems[key] = (self.kv.keep(slot.row, len(ids)), logits.clone())
        self._systems.move_to_end(key)  # (a block kept again moves to the end too)
        while len(self._systems) > SYSTEM_BLOCKS_KEPT:
            self._systems.popitem(last=False)

    # -- compute -----------------------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[..., hidden]`` -> fp32 logits ``[..., V]`` of the ids the tokenizer names."""
        return F.linear(hidden, self.lm_head, self.lm_bias).float()

    @torch.inference_mode()
    def prefill(self, slot: SinkSlot, ids: Sequence[int]) -> torch.Tensor:
        """Run ``ids`` after what ``slot`` holds; returns the next-token logits ``[V]`` (fp32)."""
        n = len(ids)
        if slot.length + n > slot.capacity:
            raise RuntimeError(f"sink cache overflow: {slot.length} + {n} > {slot.capacity} slots; "
                               "evict before writing")
        x = F.embedding(torch.as_tensor(list(ids), dtype=torch.long, device=self.device), self.embed)  # [T, H]
        hidden = self.decoder.prefill(x, self.kv, slot.row, slot.length)
        slot.length += n
        return self._logits(hidden[-1])

    def prefills(self, requests: Sequence[tuple[SinkSlot, Sequence[int]]]) -> list[torch.Tensor]:
        """Sessions' prefills (each runs its ``ids`` after what its slot holds), as cheaply as this
        device runs them; returns each one's next-token logits ``[V]`` (fp32), in order.

        Where the pass replays graphs (CUDA, graphs on): replays of :meth:`prefill_rows`, every
        request cut into pieces of at most its longest token bucket, pass ``k`` running each
        request's ``k``-th piece (one listen alone is one replay of the batch-1 bucket; a long
        catch-up, a rebuilt cache or a new system prompt a few, each some hundreds of kernels the
        host does not launch one by one). Without graphs: one request alone runs its own eager
        :meth:`prefill` (which attends only over what its row holds), several one pass at their length."""
        if not requests:
            return []
        graphs = self.prefill_graphs
        if not graphs.replays:
            if len(requests) == 1:
                return [self.prefill(*requests[0])]
            return self.prefill_rows(requests)
        longest = graphs.lengths[-1]
        pieces = [[list(ids)[i:i + longest] for i in range(0, max(len(ids), 1), longest)] for _, ids in requests]
        logits: list[torch.Tensor] = [torch.empty(0)] * len(requests)
        for k in range(max(map(len, pieces))):
            live = [i for i, p in enumerate(pieces) if k < len(p)]
            for i, out in zip(live, self.prefill_rows([(requests[i][0], pieces[i][k]) for i in live])):
                logits[i] = out
        return logits

    @torch.inference_mode()
    def prefill_rows(self, requests: Sequence[tuple[SinkSlot, Sequence[int]]]) -> list[torch.Tensor]:
        """Several sessions' prefills in one pass (each runs its ``ids`` after what its slot holds);
        returns each one's next-token logits ``[V]`` (fp32), in order. The pass's batch is the
        requests, their rows gathered by index, padded to a batch bucket and a token bucket (a
        captured graph on CUDA); a pass longer than the longest token bucket runs the same step eagerly."""
        if not requests:
            return []
        n = len(requests)
        rows = [slot.row for slot, _ in requests]
        if len(set(rows)) < n:
            raise RuntimeError(f"an LLM slot asked for twice in one prefill (rows {rows})")
        t = max(len(ids) for _, ids in requests)
        pre = self._pre
        if t > pre.tokens.host.shape[0]:
            raise RuntimeError(f"a prefill pass of {t} tokens exceeds the engine's {pre.tokens.host.shape[0]}; "
                               "run a long catch-up alone")
        graphs = self.prefill_graphs
        bucket = graphs.bucket(n)
        width = graphs.length(t) if t <= graphs.lengths[-1] else t
        tokens = pre.tokens.host
        tokens[:width, :bucket] = 0
        for i, (slot, ids) in enumerate(requests):
            if slot.length + len(ids) > slot.capacity:
                raise RuntimeError(f"sink cache overflow: {slot.length} + {len(ids)} > {slot.capacity} slots; "
                                   "evict before writing")
            tokens[:len(ids), i] = list(ids)
        pre.tokens.push(bucket, first=width)
        pre.meta.stage(bucket, [(slot.row, slot.length, len(ids)) for slot, ids in requests])
        if width in graphs.lengths:
            graphs.run(n, width)
        else:
            self._prefill_fn(bucket, width)
        for slot, ids in requests:
            slot.length += len(ids)
        return list(pre.logits[:n].clone())

    def _prefill_fn(self, b: int, t: int) -> None:
        """The captured pass: entry ``i < b`` runs its first ``count`` of ``t`` token slots into K/V
        row ``row`` from position ``start`` (its other slots, and padding entries, at the scratch
        position, which only their scratch column sees), attending over the whole window; its logits
        after its last token go to the output buffer."""
        pre = self._pre
        tokens = pre.tokens.buffer[:t, :b].T  # [b, t]
        rows, starts, counts = pre.meta.buffer[:, :b]
        hidden = self.decoder.prefill_rows(F.embedding(tokens, self.embed), rows, starts, counts, self.kv)
        pre.logits[:b] = self._logits(hidden[self._entries[:b], (counts - 1).clamp_min(0)])

    def _prepare_prefill(self, b: int) -> None:
        """Harmless inputs for entries ``0..b-1`` of the prefill pass: no tokens, the scratch row."""
        self._pre.meta.prepare(b)
        self._pre.tokens.buffer[:, :b] = 0

    def sample(self, logits: torch.Tensor, draws: Sequence[Draw]) -> list[int]:
        """One token from each row of ``logits`` ``[N, V]`` with the same sampler the decode step uses,
        row ``i`` drawn as ``draws[i]`` says (one host sync for all of them: :meth:`verdicts`)."""
        return [int(t) for t in self.verdicts(list(logits), list(draws))[1]]

    @torch.inference_mode()
    def verdicts(self, logits: Sequence[torch.Tensor], draws: Sequence[Draw | None]) -> tuple[list[float], list[int]]:
        """For each of ``logits`` (``[V]`` each, on the device): the summed probability of the
        estimate's tokens (:meth:`set_estimate_ids`; what ``token_probability`` gives) and a token
        drawn as ``draws[i]`` says (the decode step's sampler; None: not wanted, the argmax). One step
        over static buffers (a graph replay on CUDA) and one copy back: the only host sync."""
        n = len(logits)
        if n != len(draws):
            raise ValueError(f"{n} rows of logits and {len(draws)} draws")
        if not n:
            return [], []
        buf = self._verdicts
        bucket = self.verdict_graphs.bucket(n)
        torch.stack(list(logits), out=buf.logits[:n])
        ints, floats = buf.ints.host, buf.floats.host
        ints[:, :bucket] = 0
        floats[:, :bucket] = 1.0
        floats[0, :bucket] = 0.0  # padding and rows with no draw take the argmax
        for i, d in enumerate(draws):
            if d is not None:
                ints[:, i] = (draw_key(d.seed, d.counter), int(d.ban_stop))
                floats[:, i] = (d.temperature, d.top_p)
        buf.ints.push(bucket)
        buf.floats.push(bucket)
        self.verdict_graphs.run(n, 1)
        out = self._verdict_readback.read(self._verdict_readback.queue(buf.out, bucket))[:n]
        return out[:, 0].tolist(), [int(t) for t in out[:, 1].tolist()]

    def _verdict_fn(self, b: int, _length: int) -> None:
        """The captured verdict step of rows ``0..b-1``: what ``token_probability`` and the decode
        step's sampler compute, from the static buffers."""
        buf = self._verdicts
        logits = buf.logits[:b]
        probs = torch.softmax(logits, dim=-1)
        buf.out[:b, 0] = probs.index_select(1, self._estimate_ids).sum(-1)
        draws, ban = buf.ints.buffer[:, :b]
        temperature, top_p = buf.floats.buffer[:, :b]
        buf.out[:b, 1] = sample_rows(self._ban_stops(logits, ban), temperature, top_p, draws, self._keys, top_k=self.top_k).float()

    def _ban_stops(self, logits: torch.Tensor, ban: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[B, V]`` with the stop tokens out of reach in the rows where ``ban`` ``[B]`` is
        set (a reply that must not end yet), for the decode and verdict steps alike."""
        return logits.masked_fill(ban.bool()[:, None] & self._stop, float("-inf"))

    def _prepare_verdicts(self, b: int) -> None:
        """Harmless inputs for rows ``0..b-1`` of the verdict step."""
        buf = self._verdicts
        buf.logits[:b] = 0.0
        buf.ints.buffer[:, :b] = 0
        buf.floats.buffer[:, :b] = 1.0

    def _decode_fn(self, b: int, length: int) -> None:
        """The captured step: batch positions ``0..b-1`` from the static buffers, each on its K/V row,
        attending over the first ``length`` positions of the rows (a length bucket holding the longest)."""
        buf = self._buf
        tokens, positions, draws, ban, rows = buf.ints.buffer[:, :b]
        x = F.embedding(tokens, self.embed)  # [b, H]
        if self.shape_log is not None:
            self.shape_log.append((tuple(x.shape), tuple(positions.shape), tuple(self.kv.keys[0][:b].shape)))
        # the entries are on rows 0..b-1 (_pack), padding entries write the scratch row: read a view
        hidden = self.decoder.decode(x, positions, self.kv, rows, length, read_rows=slice(0, b))
        logits = self._logits(hidden)  # [b, V]
        logits = self._ban_stops(logits, ban)
        if self.keep_logits:
            buf.logits[:b] = logits
        temperature, top_p = buf.floats.buffer[:, :b]
        buf.out[:b] = self._sample(logits, temperature, top_p, draws, self._keys, top_k=self.top_k)

    @torch.inference_mode()
    def decode(self, requests: Sequence[DecodeRequest]) -> list[int]:
        """One batched step (:meth:`launch`, then :meth:`collect`): each request's token runs at its
        slot's next position (written there) and the next token is sampled. Slot lengths are *not*
        advanced: the caller commits them."""
        if not requests:
            return []
        return self.collect(self.launch(requests))

    @torch.inference_mode()
    def launch(self, requests: Sequence[DecodeRequest]) -> Launched:
        """Start one batched decode step without waiting for it: its sampled ids are copied into a
        pinned host table as the step ends (:meth:`collect` reads them; it comes before the next
        launch). The batch is the requests on rows ``0..n-1`` (:meth:`_pack` moves them there), each
        request's entry its row, padded to a bucket on the scratch row."""
        n = len(requests)
        if not requests:
            raise RuntimeError("a decode step of no rows")
        if len({id(r.slot) for r in requests}) < n:
            raise RuntimeError(f"an LLM slot asked for twice in one decode step (rows {[r.slot.row for r in requests]})")
        self._pack([r.slot for r in requests])
        rows = [r.slot.row for r in requests]
        bucket = self.graphs.bucket(n)
        ints, floats = self._buf.ints.host, self._buf.floats.host
        ints[:, :bucket] = 0
        ints[1, :bucket] = self.kv.scratch_position
        ints[4, :bucket] = self.kv.scratch_row
        floats[:, :bucket] = 0.0
        for r in requests:
            slot, d = r.slot, r.draw
            i = slot.row  # the entry: rows 0..n-1
            if slot.length >= slot.capacity:
                raise RuntimeError(f"LLM slot {slot.row} is full ({slot.length} positions); evict before decoding")
            ints[:, i] = (r.token, slot.length, draw_key(d.seed, d.counter), int(d.ban_stop), slot.row)
            floats[:, i] = (d.temperature, d.top_p)
        self._buf.ints.push(bucket)
        self._buf.floats.push(bucket)
        self.graphs.run(n, max(r.slot.length for r in requests) + 1)
        end = self._readback.queue(self._buf.out, bucket)
        self._last_step = set(rows)
        return Launched(rows, end)

    def collect(self, launched: Launched) -> list[int]:
        """The sampled ids of the step launched, after one wait for the device and one read of the
        host table: the tick's one host sync."""
        ids = self._readback.read(launched.end)[:len(launched.entries)].tolist()
        return [ids[i] for i in launched.entries]

    def last_logits(self, slot: SinkSlot) -> torch.Tensor:
        """The logits the latest decode step computed for ``slot`` (an engine made with ``keep_logits``:
        tests and inspection)."""
        if not self.keep_logits:
            raise RuntimeError("this engine keeps no logits: make it with keep_logits=True")
        if slot.row not in self._last_step:
            raise RuntimeError(f"LLM slot {slot.row} took no part in the latest decode step")
        return self._buf.logits[slot.row].clone()

    def _prepare(self, b: int) -> None:
        """Harmless inputs for batch positions ``0..b-1``: every one writes only the scratch row's scratch
        column."""
        ints, floats = self._buf.ints.buffer, self._buf.floats.buffer
        ints[:, :b] = 0
        ints[1, :b] = self.kv.scratch_position
        ints[4, :b] = self.kv.scratch_row
        floats[:, :b] = 1.0

    def capture(self, progress: Callable[[str], None] | None = None) -> None:
        """Compile the fused layers (CUDA), then warm up and capture the decode step for every bucket
        (CUDA with graphs on; else nothing)."""
        def capture() -> None:
            with torch.inference_mode():
                if self.graphs.compiled:  # prefills of one and of several tokens, into the scratch row
                    fusion.warm_prefills(self.decoder, self.kv, progress, "llm")
                self.graphs.capture(self._prepare, progress)
                self.prefill_graphs.capture(self._prepare_prefill, progress)
                self.verdict_graphs.capture(self._prepare_verdicts, progress)

        def eager() -> None:
            self.decoder.layer_fn, self._sample = self.decoder.layer, sample_rows
            self.graphs.compiled = False
            self.graphs.reset()
            self.prefill_graphs.reset()
            self.verdict_graphs.reset()

        self.graphs.compiled = fusion.with_fallback(capture, eager, self.graphs.compiled, progress, "llm")

    def ops_per_step(self, bucket: int = 1) -> int:
        """Kernels one decode step of ``bucket`` rows launches (eager; :mod:`duplex.engine.opcount`)."""
        sample, self._sample = self._sample, sample_rows
        try:
            with fusion.eager_layers(self.decoder):
                return self.graphs.ops(self._prepare, bucket)
        finally:
            self._sample = sample

    def step_bytes(self, rows: int, length: int | None = None) -> int:
        """Bytes a decode step of ``rows`` rows over ``length`` positions (the whole window by
        default) must read: the layers' and output layer's weights, and each row's K/V over them."""
        from duplex.engine.roofline import weight_bytes

        layers = weight_bytes(self.model.model.layers, self.model.model.norm)
        head = self.lm_head.numel() * self.lm_head.element_size()
        columns = self.kv.columns if length is None else min(length, self.kv.columns)
        return layers + head + rows * self.kv.slot_nbytes() * columns // self.kv.columns


def token_probability(logits: torch.Tensor, token_ids: Sequence[int]) -> float:
    """Total probability of ``token_ids`` under ``logits`` ``[V]``."""
    return token_probabilities(logits, [token_ids])[0]


def token_probabilities(logits: torch.Tensor, id_sets: Sequence[Sequence[int]]) -> list[float]:
    """Total probability of each set of ``id_sets`` under ``logits`` ``[V]``: one softmax, one host
    copy for all of them (a backchannel check's "yes" and "no" together)."""
    probs = torch.softmax(logits[None].float(), dim=-1)
    return torch.cat([probs[:, list(ids)].sum(-1) for ids in id_sets]).tolist()


@dataclass
class TextDecoder:
    """Incremental detokenisation: text for each new token, holding back incomplete characters.

    Decodes a short window of recent tokens so that tokenizers whose pieces depend on their
    neighbours (SentencePiece spaces, byte fallback) produce the same text as one decode of all.
    """

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # window start
    read: int = 0  # tokens already turned into text

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
