"""Greedy RNNT and CTC decoding, batched across sessions, with decoding state carried across chunks.

Each decoder keeps the state of every session in a slot (like the encoder's
:class:`~duplex.asr.encoder.CachePool`): for RNNT the prediction network's LSTM state and its
projected output for the last emitted label, for CTC the last frame's label. ``decode`` takes one
chunk of encoder output for a batch of sessions and returns, per session, the tokens emitted as
``(frame, token)`` with ``frame`` the index within the chunk, and the call that writes the sessions'
new state (the streaming step calls it once the whole batch has run). The decisions are NeMo's greedy ones
(argmax of the joint, at most ``max_symbols`` labels per frame; CTC collapses repeats and drops
blanks), so a stream decoded chunk by chunk gives the tokens the offline decoder gives.

End-of-utterance labels (``reset_ids``, e.g. ``<EOU>``) are emitted and then reset the session's
decoding state, so the next utterance decodes from a clean start.

RNNT decoding runs three ways, with the same decisions: frame by frame, each frame stopping at its
first blank (eager: a host sync a label step); frame by frame with every label step of every frame
(static: nothing asks the host); and looping over labels in a fixed number of label steps, each row
on its own frame (:meth:`RNNTGreedy.loop_labels`, what the captured ASR step runs; a row that needs
more steps says so, and the static decoding decodes its chunk again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Tokens = list[tuple[int, int]]  # (frame within the chunk, token id)
Commit = Callable[[], None]  # writes the state a step computed into the sessions' slots


class RNNTGreedy:
    """Greedy transducer decoding (frame by frame, up to ``max_symbols`` labels per frame)."""

    def __init__(self, decoder, joint, *, max_symbols: int, reset_ids: Iterable[int], capacity: int,
                 device: str, dtype: torch.dtype) -> None:
        import torch

        self.decoder, self.joint = decoder, joint
        self.blank = int(decoder.blank_idx)
        self.max_symbols = max(1, int(max_symbols))
        self.reset_ids = torch.tensor(sorted(set(reset_ids)), dtype=torch.int64, device=device)
        self.device, self.dtype = device, dtype
        # State after the start-of-sequence (blank) input: where every utterance begins.
        sos = torch.full((1, 1), self.blank, dtype=torch.int64, device=device)
        g, (h, c) = decoder.predict(sos, None, add_sos=False, batch_size=1)
        self.g0 = joint.project_prednet(g)  # [1, 1, H]
        self.h0, self.c0 = h, c  # [layers, 1, H]
        self.capacity = 0
        self.g: torch.Tensor  # the three are allocated (and regrown) by grow()
        self.h: torch.Tensor
        self.c: torch.Tensor
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        g = self.g0.repeat(capacity, 1, 1)
        h, c = self.h0.repeat(1, capacity, 1), self.c0.repeat(1, capacity, 1)
        if self.capacity:
            g[: self.capacity], h[:, : self.capacity], c[:, : self.capacity] = self.g, self.h, self.c
        self.g, self.h, self.c, self.capacity = g, h, c, capacity

    def reset(self, slots: torch.Tensor) -> None:
        self.g[slots] = self.g0
        self.h[:, slots] = self.h0
        self.c[:, slots] = self.c0

    def decode(self, encoded: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> tuple[list[Tokens], Commit]:
        """``encoded`` [B, D, T]; ``valid`` [B, T] bool: frames to decode (others are skipped). Returns
        each session's tokens and the call that advances their decoding state (nothing is written
        before it)."""
        labels, apply = self.labels(encoded, slots, valid, static=False)
        return self.tokens(labels), apply

    def labels(self, encoded: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, *, static: bool
               ) -> tuple[torch.Tensor, Commit]:
        """The labels emitted, ``[B, T, max_symbols]`` (-1: none), and the commit of the new state.

        ``static``: every frame runs all ``max_symbols`` label steps and nothing asks the host (a
        step that can be captured in a CUDA graph; rows with nothing to emit keep their state, so the
        labels are the same); otherwise a frame stops at its first step where no row emits (one small
        host sync a step)."""
        import torch

        batch, _, frames = encoded.shape
        f = self.joint.project_encoder(encoded.transpose(1, 2))  # [B, T, H]
        g = self.g.index_select(0, slots)  # [B, 1, H]
        h, c = self.h.index_select(1, slots), self.c.index_select(1, slots)  # [layers, B, H]
        labels: list[torch.Tensor] = []  # [B] per (frame, label step), stacked once at the end
        emits: list[torch.Tensor] = []
        none = None  # the label steps an eager frame skipped: nothing emitted
        for t in range(frames):
            active = valid[:, t]
            for step in range(self.max_symbols):
                label, emit = self._choose(f[:, t:t + 1], g, active)
                if not static and not bool(emit.any()):  # the host sync of an eager step
                    if none is None:
                        none = torch.zeros(batch, dtype=torch.bool, device=encoded.device)
                    labels.extend([label] * (self.max_symbols - step))
                    emits.extend([none] * (self.max_symbols - step))
                    break
                labels.append(label)
                emits.append(emit)
                active, g, h, c = self._advance(label, emit, g, h, c)
        out = (self._emitted(labels, emits).view(batch, frames, self.max_symbols) if labels
               else torch.full((batch, 0, self.max_symbols), -1, dtype=torch.int64, device=encoded.device))
        return out, self._commit(slots, g, h, c)

    def loop_labels(self, encoded: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, steps: int
                    ) -> tuple[torch.Tensor, Commit]:
        """The same decisions as :meth:`labels`, in ``steps`` label steps that loop over labels, not
        frames, and never ask the host (a step that can be captured in a CUDA graph).

        Each row keeps its own frame: a step joins the row's frame with its last label, and the row
        moves to the next frame after a blank, an end-of-utterance label or its frame's
        ``max_symbols``-th label (NeMo's label-looping greedy decoding makes the same walk). So a row
        needs one step per frame plus one per label, where the frame-looping static decoding runs
        ``frames * max_symbols`` steps whatever is emitted. ``valid`` [B, T]: a row's valid frames are
        its last ones (a fresh stream skips its first frames; a padding row has none).

        Returns ``[B, 2 * steps + 1]`` long (:meth:`loop_tokens` reads it): each step's label (-1:
        none), each step's frame, and 1 where the row reached the end of its frames within the steps;
        a row that did not (more labels than the steps allow) must be decoded again by :meth:`labels`,
        and its commit is then that call's. The commit writes the rows' new state."""
        import torch

        batch, _, frames = encoded.shape
        f = self.joint.project_encoder(encoded.transpose(1, 2))  # [B, T, H]
        g = self.g.index_select(0, slots)  # [B, 1, H]
        h, c = self.h.index_select(1, slots), self.c.index_select(1, slots)  # [layers, B, H]
        t = frames - valid.sum(dim=1)  # [B] each row's frame: its first valid one
        # labels emitted on the row's frame so far, modulo max_symbols; counted only where the steps
        # can reach max_symbols labels on one frame
        symbols = torch.zeros_like(t) if steps >= self.max_symbols else None
        labels: list[torch.Tensor] = []
        emits: list[torch.Tensor] = []
        at: list[torch.Tensor] = []
        for _ in range(steps):
            ft = f.gather(1, t.clamp(max=frames - 1).view(-1, 1, 1).expand(-1, 1, f.size(2)))  # [B, 1, H]
            label, emit = self._choose(ft, g, t < frames)
            labels.append(label)
            emits.append(emit)
            at.append(t)
            keep, g, h, c = self._advance(label, emit, g, h, c)
            if symbols is None:
                advance = ~keep
            else:  # 0 after a blank, an end label or the frame's max_symbols-th label
                symbols = (symbols + 1) * keep % self.max_symbols
                advance = symbols == 0
            t = t + advance
        out = torch.cat([self._emitted(labels, emits), torch.stack([*at, (t >= frames).long()], dim=1)], dim=1)
        return out, self._commit(slots, g, h, c)

    def _choose(self, f: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One label step's choice for every row: the argmax of the joint of its frame ``f`` [B, 1, H]
        and its last label's ``g`` [B, 1, H], and whether it is a label the row emits (not blank, the
        row ``active``)."""
        logits = self.joint.joint_after_projection(f, g)  # [B, 1, 1, V+1]
        label = logits[:, 0, 0].argmax(dim=-1)  # [B]
        return label, active & (label != self.blank)

    def _advance(self, label: torch.Tensor, emit: torch.Tensor, g: torch.Tensor, h: torch.Tensor, c: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prediction network's state after the rows' ``label`` where they ``emit`` it (an
        end-of-utterance label resets it instead), and which rows go on emitting on their frame."""
        import torch

        batch = label.size(0)
        g_new, (h_new, c_new) = self.decoder.predict(label.unsqueeze(1), (h, c), add_sos=False, batch_size=batch)
        g_new = self.joint.project_prednet(g_new)
        keep = emit
        if self.reset_ids.numel() > 0:
            ended = emit & torch.isin(label, self.reset_ids)
            keep = emit & ~ended
            # an end-of-utterance label resets the state; decoding resumes on the next frame
            g = torch.where(ended.view(-1, 1, 1), self.g0, g)
            h = torch.where(ended.view(1, -1, 1), self.h0, h)
            c = torch.where(ended.view(1, -1, 1), self.c0, c)
        g = torch.where(keep.view(-1, 1, 1), g_new, g)
        h = torch.where(keep.view(1, -1, 1), h_new, h)
        c = torch.where(keep.view(1, -1, 1), c_new, c)
        return keep, g, h, c

    @staticmethod
    def _emitted(labels: list[torch.Tensor], emits: list[torch.Tensor]) -> torch.Tensor:
        """``[B, steps]``: each step's label where the row emitted it, -1 where not (one pass for all
        the steps, not one per step)."""
        import torch

        return torch.where(torch.stack(emits, dim=1), torch.stack(labels, dim=1), -1)

    def _commit(self, slots: torch.Tensor, g: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Commit:
        def apply() -> None:
            self.g.index_copy_(0, slots, g)
            self.h.index_copy_(1, slots, h)
            self.c.index_copy_(1, slots, c)

        return apply

    @staticmethod
    def loop_tokens(out: torch.Tensor) -> list[Tokens | None]:
        """Each row's ``(frame, token)`` from :meth:`loop_labels`, None for a row whose steps ended
        before its frames did (one copy to the host)."""
        steps = (out.size(1) - 1) // 2
        rows: list[Tokens | None] = []
        for row in out.tolist():
            rows.append([(t, k) for k, t in zip(row[:steps], row[steps:2 * steps]) if k >= 0] if row[-1] else None)
        return rows

    @staticmethod
    def tokens(labels: torch.Tensor) -> list[Tokens]:
        """Each row's ``(frame, token)`` from :meth:`labels` (one copy to the host)."""
        return [[(t, k) for t, row in enumerate(frames) for k in row if k >= 0] for frames in labels.tolist()]


class CTCGreedy:
    """Greedy CTC decoding: argmax per frame, repeats collapsed across chunk boundaries."""

    def __init__(self, ctc_decoder, *, blank: int, reset_ids: Iterable[int], capacity: int) -> None:
        self.ctc_decoder = ctc_decoder
        self.blank = int(blank)
        self.reset_ids = frozenset(int(i) for i in reset_ids)
        self.prev: list[int] = []
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        if capacity > len(self.prev):
            self.prev.extend([self.blank] * (capacity - len(self.prev)))

    def reset(self, slots: torch.Tensor) -> None:
        for s in slots.tolist():
            self.prev[s] = self.blank

    def decode(self, encoded: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> tuple[list[Tokens], Commit]:
        labels = self.ctc_decoder(encoder_output=encoded).argmax(dim=-1).tolist()  # [B, T]
        valid_rows = valid.tolist()
        out: list[Tokens] = []
        last: dict[int, int] = {}
        for b, slot in enumerate(slots.tolist()):
            prev, tokens = self.prev[slot], []
            for t, (k, ok) in enumerate(zip(labels[b], valid_rows[b])):
                if not ok:
                    continue
                if k != self.blank and k != prev:
                    tokens.append((t, k))
                prev = self.blank if k in self.reset_ids else k
            out.append(tokens)
            last[slot] = prev

        def apply() -> None:
            for slot, prev in last.items():
                self.prev[slot] = prev

        return out, apply
