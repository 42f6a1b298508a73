"""Silero VAD's network, run by our own code for many sessions at once: one captured step per tick.

The network (Silero VAD v5, 16 kHz) is small: a fixed STFT as a convolution, four convolutions, an
LSTM cell and a one-channel head, some thirty kernels a window. :func:`silero_forward` runs it in
plain PyTorch over the weights read from the TorchScript file the ``silero-vad`` package ships (the
numbers are the TorchScript network's: ``tests/test_asr_audio.py`` compares them), so the step can
be what the other engines' steps are: static buffers, one CUDA graph per bucket.

:class:`SileroStep` holds every session's recurrent state in one device buffer, a row per stream
(:class:`~duplex.engine.slots.SlotPool`, the scratch row last), and steps a tick's streams together:

- inputs staged into pinned host copies (``engine.staging.Staged``): each stream's whole windows
  (up to :data:`CATCH_UP` a tick), its row, its window count, whether its state starts from zero,
  and its peek (the newest audio, scored from the state after its windows without keeping what
  that changes), pushed to the device once a tick;
- the step: window ``k`` of every stream as one batch (a stream with fewer windows keeps its state
  there), then the peeks, the states written back to their rows; captured per (batch, windows)
  bucket on CUDA, with and without peeks (``BucketedStep``);
- a step holds up to :data:`DEPTHS`' longest (4) windows a stream; a stream that fell further
  behind takes several steps in its tick, each next one's windows and counts moved into place on
  the device and each step's probabilities kept there, so the tick still ends with
- one copy back of every probability: the tick's one host sync (a stream more than
  :data:`CATCH_UP` windows, a second of audio, behind waits once per second it catches up).

On the CPU (and with ``--no-graphs``) the same step runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from duplex.engine.graphs import BucketedStep, buckets_for
from duplex.engine.slots import SlotPool
from duplex.engine.staging import Readback, Staged

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WINDOW = 512  # samples per Silero window at 16 kHz
CONTEXT = 64  # samples of the previous window prefixed to each window
STATE = 128  # the LSTM's width: a stream's state is [2, STATE] (h and c)
DEPTHS = (1, 2, 4)  # whole windows per stream a captured step holds
CATCH_UP = 32  # windows per stream staged in one tick (a second of audio): several steps, one host sync
ROWS = 256  # state rows allocated at load (1 KB each); more sessions at once grow them (eager then)


@dataclass
class SileroWeights:
    """The network's tensors, read once from the TorchScript module (on the step's device)."""

    basis: torch.Tensor  # [2 * 129, 1, 256]: the STFT's real and imaginary filters
    hop: int
    pad: int  # reflected samples added at the right before the STFT
    convs: list[tuple[torch.Tensor, torch.Tensor, int]]  # (weight, bias, stride), each padded by 1, then ReLU
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor
    b_hh: torch.Tensor
    head_w: torch.Tensor  # [1, 128, 1]
    head_b: torch.Tensor

    @classmethod
    def from_jit(cls, net: Any) -> SileroWeights:
        """From Silero's 16 kHz inner network (``torch.jit.load(...)._model``); a file of another
        layout is refused by name."""
        try:
            stft, encoder, decoder = net.stft, net.encoder, net.decoder
            convs = []
            for i in range(4):
                conv = getattr(getattr(encoder, str(i)), "reparam_conv")
                if tuple(conv.padding) != (1,) or tuple(conv.dilation) != (1,):
                    raise ValueError(f"encoder conv {i}: padding {conv.padding}, dilation {conv.dilation}")
                convs.append((conv.weight.detach(), conv.bias.detach(), int(conv.stride[0])))
            head = getattr(decoder.decoder, "2")
            pad = tuple(stft.padding.padding)
            if pad[0] != 0:
                raise ValueError(f"STFT padding {pad}")
            return cls(basis=stft.forward_basis_buffer.detach(), hop=int(stft.hop_length), pad=int(pad[1]),
                       convs=convs, w_ih=decoder.rnn.weight_ih.detach(), w_hh=decoder.rnn.weight_hh.detach(),
                       b_ih=decoder.rnn.bias_ih.detach(), b_hh=decoder.rnn.bias_hh.detach(),
                       head_w=head.weight.detach(), head_b=head.bias.detach())
        except (AttributeError, RuntimeError, ValueError) as exc:
            raise RuntimeError(f"the Silero VAD file has a layout this version does not know ({exc}); "
                               "install silero-vad 5.x") from exc


def silero_forward(w: SileroWeights, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One window of ``B`` streams: ``x`` ``[B, CONTEXT + WINDOW]``, state ``h``, ``c`` ``[B, STATE]``
    -> speech probability ``[B]`` and the next ``h``, ``c``. The TorchScript network's ops, in its order."""
    import torch
    import torch.nn.functional as F

    spec = F.conv1d(F.pad(x, (0, w.pad), mode="reflect")[:, None], w.basis, stride=w.hop)  # [B, 258, T]
    half = spec.shape[1] // 2
    y = torch.sqrt(spec[:, :half].pow(2) + spec[:, half:].pow(2))
    for weight, bias, stride in w.convs:
        y = F.relu(F.conv1d(y, weight, bias, stride=stride, padding=1))
    h, c = torch.lstm_cell(y[..., 0], [h, c], w.w_ih, w.w_hh, w.b_ih, w.b_hh)
    out = torch.sigmoid(F.conv1d(F.relu(h[..., None]), w.head_w, w.head_b))  # [B, 1, 1]
    return out[:, 0].mean(1), h, c


class SileroStep:
    """Every stream's VAD state on the device and the step over a tick's streams (module docstring).
    ``run`` is called on the VAD's worker thread; ``rows`` is taken and given on the event loop."""

    def __init__(self, net: Any, device: str, max_batch: int, *, graphs: bool = True) -> None:
        import torch

        self.device = torch.device(device)
        self.w = SileroWeights.from_jit(net)
        self.max_batch = max_batch
        self.scratch = ROWS  # the row padding entries read and write
        self.rows = SlotPool("VAD stream rows", None, reserved=(self.scratch,))
        self.states = torch.zeros(ROWS + 1, 2, STATE, device=self.device)
        # a step reads windows [0, 4) of this buffer; a tick stages up to CATCH_UP, and its later
        # steps move theirs into place on the device
        self._windows = Staged((CATCH_UP, CONTEXT + WINDOW, max_batch), torch.float32, self.device)
        self._peeks = Staged((CONTEXT + WINDOW, max_batch), torch.float32, self.device)
        # row, windows this step, starts from zero, windows this tick (the step reads the first three)
        self._meta = Staged((4, max_batch), torch.long, self.device)
        self._out = torch.zeros(max_batch, DEPTHS[-1] + 1, device=self.device)  # the last column: the peek
        self._back = Readback((max_batch, DEPTHS[-1] + 1), torch.float32, self.device)
        # a tick of several steps: each step's probabilities at columns [4k, 4k + 4), the last one's peek after
        self._caught = torch.zeros(max_batch, CATCH_UP + 1, device=self.device)
        self._caught_back = Readback((max_batch, CATCH_UP + 1), torch.float32, self.device)
        buckets = buckets_for(max_batch)
        self.graphs = BucketedStep("vad", self._windows_fn, buckets, DEPTHS, device=device, graphs=graphs)
        self.peek_graphs = BucketedStep("vad peek", self._peek_fn, buckets, (0, *DEPTHS), device=device,
                                        graphs=graphs)

    def capture(self, progress: Any = None) -> None:
        """Warm up (and on CUDA capture) every bucket, at load. A capture that fails is reported and
        the step runs eagerly; an operator the device lacks fails here (the caller then picks the CPU)."""
        import torch

        with torch.no_grad():
            try:
                self.graphs.capture(self._prepare, progress)
                self.peek_graphs.capture(self._prepare, progress)
            except Exception as exc:
                if not self.graphs.graphs_enabled:
                    raise
                log.warning("the VAD's step could not be captured (%s: %s); it runs eagerly", type(exc).__name__, exc)
                for step in (self.graphs, self.peek_graphs):
                    step.reset()
                    step.graphs_enabled = False
                for b in self.graphs.buckets[-1:]:  # the device runs the step at all
                    self._prepare(b)
                    self._fn(b, DEPTHS[-1], peek=True)

    def _prepare(self, b: int) -> None:
        """Harmless inputs for entries ``0..b-1``: the scratch row, no windows."""
        self._meta.buffer[0, :b] = self.scratch
        self._meta.buffer[1:, :b] = 0

    def grow(self, top: int) -> None:
        """Room for rows below ``top``: past the rows the step was captured over, the state buffer is
        made anew (twice as many) and the step runs eagerly from then on (a captured graph would
        keep reading the old buffer). The scratch row stays where it was (the pool never gives it)."""
        import torch

        if top <= self.states.shape[0]:
            return
        for step in (self.graphs, self.peek_graphs):
            if step.captured:
                log.warning("%d VAD streams at once exceed the %d its step was captured for; it runs eagerly "
                            "from now on", top, self.scratch)
            step.reset()
            step.graphs_enabled = False
        states = torch.zeros(max(top, 2 * self.states.shape[0]), 2, STATE, device=self.device)
        states[:self.states.shape[0]] = self.states
        self.states = states

    # -- worker thread -----------------------------------------------------------------------------

    def run(self, requests: Sequence[tuple[int, bool, np.ndarray, np.ndarray | None]]
            ) -> list[tuple[np.ndarray, float | None]]:
        """``(row, fresh, windows [n, CONTEXT + WINDOW], peek or None)`` per stream -> its windows'
        probabilities and its peek's. At most :attr:`max_batch` streams."""
        import torch

        b = len(requests)
        self.grow(max(row for row, _, _, _ in requests) + 1)
        probs: list[list[np.ndarray]] = [[] for _ in requests]
        peeks: list[float | None] = [None] * b
        depth = max(len(r[2]) for r in requests)
        with torch.no_grad():
            for first in range(0, max(depth, 1), CATCH_UP):  # one pass unless a stream is a second behind
                n = min(depth - first, CATCH_UP)
                look = first + n >= depth and any(r[3] is not None for r in requests)
                table = self._pass(requests, first, n, look)
                for i, (_, _, windows, peek) in enumerate(requests):
                    probs[i].append(table[i, :max(0, min(n, len(windows) - first))].copy())
                    if look and peek is not None:
                        peeks[i] = float(table[i, -1])
        return [(np.concatenate(p), peek) for p, peek in zip(probs, peeks)]

    def _pass(self, requests: Sequence[tuple[int, bool, np.ndarray, np.ndarray | None]], first: int, n: int,
              look: bool) -> np.ndarray:
        """Windows ``[first, first + n)`` of every stream (``n`` <= CATCH_UP), staged at once and run in
        steps of up to 4 (the later ones' windows and counts moved into place on the device, each
        step's probabilities kept on the device), then one copy back: ``[b, n + 1]``, the last
        column the peeks (when ``look``)."""
        import torch

        b = len(requests)
        bucket = self.graphs.bucket(b)
        meta, windows = self._meta.host, self._windows.host
        meta[0, :bucket], meta[1:, :bucket] = self.scratch, 0
        for i, (row, starts, x, peek) in enumerate(requests):
            count = max(0, min(n, len(x) - first))
            meta[:, i] = (row, min(count, DEPTHS[-1]), int(first == 0 and starts), count)
            if count:
                windows[:count, :, i] = x[first:first + count]
            if look:
                self._peeks.host[:, i] = 0 if peek is None else peek
        self._meta.push(bucket)
        if n:
            self._windows.push(bucket, first=n)
        if look:
            self._peeks.push(bucket)
        steps = max(1, -(-n // DEPTHS[-1]))
        for k in range(steps):
            m = min(n - k * DEPTHS[-1], DEPTHS[-1])
            if k:  # this step's windows and counts into place; no stream starts from zero now
                self._windows.buffer[:m, :, :bucket] = self._windows.buffer[k * DEPTHS[-1]:k * DEPTHS[-1] + m, :, :bucket]
                torch.clamp(self._meta.buffer[3, :bucket] - k * DEPTHS[-1], 0, DEPTHS[-1],
                            out=self._meta.buffer[1, :bucket])
                self._meta.buffer[2, :bucket] = 0
            (self.peek_graphs if look and k == steps - 1 else self.graphs).run(b, m)
            if steps > 1:  # kept on the device: the tick copies back once
                end = k * DEPTHS[-1] + (DEPTHS[-1] + 1 if k == steps - 1 else DEPTHS[-1])
                self._caught[:b, k * DEPTHS[-1]:end] = self._out[:b, :end - k * DEPTHS[-1]]
        if steps == 1:
            table = self._back.read(self._back.queue(self._out, b)).numpy()
            return np.concatenate([table[:b, :n], table[:b, -1:]], axis=1)
        table = self._caught_back.read(self._caught_back.queue(self._caught, b)).numpy()
        last = (steps - 1) * DEPTHS[-1] + DEPTHS[-1]  # the peek column of the last step
        return np.concatenate([table[:b, :n], table[:b, last:last + 1]], axis=1)

    def _windows_fn(self, b: int, depth: int) -> None:
        self._fn(b, depth, peek=False)

    def _peek_fn(self, b: int, depth: int) -> None:
        self._fn(b, depth, peek=True)

    def _fn(self, b: int, depth: int, *, peek: bool) -> None:
        """The step (what a graph holds): ``depth`` windows of entries ``0..b-1``, each on its state row
        (an entry keeps its state past its own windows), then their peeks; states written back."""
        import torch

        rows, counts, fresh = self._meta.buffer[:3, :b]
        state = self.states[rows].masked_fill(fresh[:, None, None] > 0, 0.0)  # [b, 2, STATE]
        h, c = state[:, 0], state[:, 1]
        for k in range(depth):
            p, h2, c2 = silero_forward(self.w, self._windows.buffer[k, :, :b].T, h, c)
            self._out[:b, k] = p
            kept = (counts > k)[:, None]
            h, c = torch.where(kept, h2, h), torch.where(kept, c2, c)
        if peek:
            p, _, _ = silero_forward(self.w, self._peeks.buffer[:, :b].T, h, c)
            self._out[:b, DEPTHS[-1]] = p
        self.states[rows] = torch.stack([h, c], dim=1)
