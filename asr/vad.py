"""Streaming voice activity detection on Silero VAD, batched across sessions.

Silero VAD scores 512-sample windows (32 ms at 16 kHz), each prefixed by the last 64 samples of the
previous window, with a recurrent state. Its network runs as our own step over every session's state
(:mod:`duplex.asr.silero`: the weights read from the TorchScript file, each stream's state a row of
one device buffer), so one network serves every session: a
:class:`~duplex.engine.scheduler.Scheduler` hands the windows of all sessions that have audio ready
to one step, captured as a CUDA graph per bucket on a GPU. The step runs on the agent's device
(beside the other models on a GPU, so the host's CPU threads are not the VAD's): the windows of a
tick go over in one copy, and the probabilities (and peeks) come back in one, the step's only host
sync. Speech boundaries come from a hysteresis on the probabilities (start above ``threshold`` for
``min_speech_ms``, end below ``neg_threshold`` for ``min_silence_ms``) and carry exact stream times;
each change of the window-by-window decision is a ``VoiceEdge`` (the earliest sign of speech, one
window in).

The weights ship inside the ``silero-vad`` package; we load the TorchScript file directly, without
importing the package (whose import sets torch to one thread for the whole process).
"""

from __future__ import annotations

import importlib.util
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duplex.asr.silero import CONTEXT, WINDOW
from duplex.clock import now
from duplex.config import AgentConfig
from duplex.errors import ModelNotFoundError
from duplex.events import SpeechStarted, SpeechStopped, VADEvent, VoiceEdge
from duplex.engine.scheduler import CLOCK_S, Scheduler

log = logging.getLogger(__name__)

PROBS_KEPT = 3000  # windows of probability kept for inspection (96 s): bounded, however long a session runs



@dataclass
class VADSettings:
    threshold: float = 0.5
    neg_threshold: float = 0.35
    min_speech_ms: int = 64
    min_silence_ms: int = 160


def silero_jit_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the silero-vad package is not installed; pip install silero-vad")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    if not path.is_file():
        raise ModelNotFoundError(f"Silero VAD weights missing at {path}; reinstall silero-vad")
    return path


PEEK_MIN = 160  # new samples (10 ms) past the last whole window before a peek is worth a call


@dataclass
class _Request:
    row: int  # the stream's state row (asr.silero.SileroStep.rows)
    fresh: bool  # its state starts from zero (the stream's first windows, or its first since a close)
    windows: np.ndarray  # [N, CONTEXT + WINDOW] float32
    peek: np.ndarray | None = None  # [CONTEXT + WINDOW]: the newest audio, scored from the final state, not kept


@dataclass
class VADStreamState:
    """What one session's VAD carries between packets (its recurrent state stays in the step's rows)."""

    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    scored: int = 0  # samples scored so far
    speaking: bool = False
    speech_start: int = 0
    run_start: int | None = None  # start of the current run that may flip the state
    recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # the newest CONTEXT + WINDOW samples
    peek_voiced: bool = False  # a peek found voice the next whole window has not judged yet


class SileroVAD:
    """The VAD model: one Silero network shared by all sessions through a batching worker."""

    def __init__(self, settings: VADSettings | None = None, device: str = "cpu", max_batch: int = 64, *,
                 graphs: bool = True) -> None:
        import torch

        from duplex.asr.silero import SileroStep

        self.settings = settings or VADSettings()
        self.device = device
        net = torch.jit.load(str(silero_jit_path()), map_location=device)._model.eval()
        self.net = SileroStep(net, device, max_batch, graphs=graphs)
        self.net.capture()  # every bucket run once (a device that lacks an operator fails here, at load)
        # on the engines' 20 ms clock: the windows every session's block completes, in one step
        self.worker: Scheduler[_Request, tuple[np.ndarray, float | None]] = Scheduler(
            "vad", self._step, device=device, max_batch=max_batch, clock=CLOCK_S)

    def new_stream(self) -> SileroVADStream:
        return SileroVADStream(self)

    def _step(self, requests: Sequence[_Request]) -> list[tuple[np.ndarray, float | None]]:
        """Score the windows of many streams in lockstep, then their peeks (from each stream's state
        after its windows, which a peek does not change), on the worker thread: one step
        (:class:`~duplex.asr.silero.SileroStep`, captured on CUDA), one copy back of every probability."""
        return self.net.run([(r.row, r.fresh, r.windows, r.peek) for r in requests])


class SileroVADStream:
    """One session's VAD (see :class:`VADStreamState`); its recurrent state is a row of the step's."""

    def __init__(self, model: SileroVAD) -> None:
        self.model = model
        self.s = VADStreamState()
        self.row: int | None = None  # taken at the first windows, given back at aclose
        self.fresh = True  # the next step starts its state from zero
        self.probs: deque[float] = deque(maxlen=PROBS_KEPT)  # the latest windows' probabilities, for inspection

    async def feed(self, pcm: np.ndarray, peek: bool = False) -> list[VADEvent]:
        """Score the whole windows ``pcm`` completes; their speech boundaries and voice edges.

        ``peek`` (while the agent speaks, when a window sooner matters): also score the newest
        window's worth of audio, ending at the last sample given, from the state after the last
        whole window, without keeping what it changes; voice there is a :class:`VoiceEdge` up to a
        window before the whole window that holds it completes (the next whole window judges it)."""
        s = self.s
        pcm = pcm.astype(np.float32, copy=False)
        s.recent = np.concatenate([s.recent, pcm])[-(CONTEXT + WINDOW):]
        audio = np.concatenate([s.pending, pcm])
        n = len(audio) // WINDOW
        s.pending = audio[n * WINDOW:]
        look = peek and len(s.pending) >= PEEK_MIN and len(s.recent) == CONTEXT + WINDOW and not self._voiced()
        if n == 0 and not look:
            return []
        blocks = audio[: n * WINDOW].reshape(n, WINDOW)
        contexts = np.concatenate([s.context[None], blocks[:-1, -CONTEXT:]], axis=0)[:n]
        windows = np.concatenate([contexts, blocks], axis=1)  # [n, 576]
        if n:
            s.context = blocks[-1, -CONTEXT:].copy()
        if self.row is None:
            self.row, self.fresh = self.model.net.rows.take(), True
        probs, p = await self.model.worker.submit(
            _Request(self.row, self.fresh, windows, s.recent.copy() if look else None), key=self)
        self.fresh = False
        events = self._detect(probs)
        if p is not None and p >= self.model.settings.threshold and not self._voiced():
            s.peek_voiced = True
            end = s.scored + len(s.pending)
            events.append(VoiceEdge(stream_samples=end, wall=now(), at=end - WINDOW, voiced=True))
        return events

    def samples_short(self) -> int:
        """Samples still missing before a feed without ``peek`` completes a window (1 to WINDOW)."""
        return WINDOW - len(self.s.pending)

    def _voiced(self) -> bool:
        """The window-by-window decision so far: the state, unless a run that may flip it is under
        way, or voice a peek found."""
        s = self.s
        return (s.speaking != (s.run_start is not None)) or s.peek_voiced

    def _detect(self, probs: np.ndarray) -> list[VADEvent]:
        """Hysteresis over the windows' probabilities. The window-by-window decision is the state
        unless a run that may flip it is under way (``run_start`` set): each change of it is a
        :class:`VoiceEdge` at that window, the flip itself a SpeechStarted / SpeechStopped."""
        s, cfg = self.s, self.model.settings
        events: list[VADEvent] = []
        for p in probs:
            start = s.scored
            s.scored += WINDOW
            self.probs.append(float(p))
            voiced_before = self._voiced()
            s.peek_voiced = False  # this window judges what a peek heard
            flip: SpeechStarted | SpeechStopped | None = None
            if not s.speaking:
                if p >= cfg.threshold:
                    s.run_start = start if s.run_start is None else s.run_start
                    if s.scored - s.run_start >= cfg.min_speech_ms * 16:
                        s.speaking, s.speech_start, s.run_start = True, s.run_start, None
                        flip = SpeechStarted(stream_samples=s.scored, wall=now(), start=s.speech_start)
                else:
                    s.run_start = None
            else:
                if p < cfg.neg_threshold:
                    s.run_start = start if s.run_start is None else s.run_start
                    if s.scored - s.run_start >= cfg.min_silence_ms * 16:
                        flip = SpeechStopped(stream_samples=s.scored, wall=now(), start=s.speech_start, end=s.run_start)
                        s.speaking, s.run_start = False, None
                elif p >= cfg.threshold:
                    s.run_start = None
            voiced = self._voiced()
            if voiced != voiced_before:
                events.append(VoiceEdge(stream_samples=s.scored, wall=now(), at=start, voiced=voiced))
            if flip is not None:
                events.append(flip)
        return events

    async def aclose(self) -> None:
        """Give the state row back and start over (a later feed is a new stream's first)."""
        self.s = VADStreamState()
        if self.row is not None:
            self.model.net.rows.give(self.row)
            self.row = None


def build_vad(config: AgentConfig, device: str) -> SileroVAD:
    """The VAD for every profile: real Silero, on the agent's device (on a GPU its per-tick step,
    captured unless ``graphs`` is off, leaves the host's CPU threads alone). A device its network
    cannot run on is reported and the VAD runs on the CPU."""
    if device != "cpu":
        try:
            return SileroVAD(device=device, graphs=config.graphs)
        except Exception as exc:  # (an operator the device lacks: the load's warm-up calls find it)
            log.warning("the Silero VAD does not run on %s (%s: %s); it runs on the CPU", device,
                        type(exc).__name__, exc)
    return SileroVAD(device="cpu")
