"""Streaming voice activity detection on Silero VAD, batched across sessions.

Silero VAD scores 512-sample windows (32 ms at 16 kHz), each prefixed by the last 64 samples of the
previous window, with a recurrent state. We call its inner network with that state passed explicitly,
so one loaded network serves every session: a :class:`~duplex.engine.scheduler.Scheduler` stacks the windows
and states of all sessions that have audio ready into one step. Speech boundaries come from a
hysteresis on the probabilities (start above ``threshold`` for ``min_speech_ms``, end below
``neg_threshold`` for ``min_silence_ms``) and carry exact stream times; each change of the
window-by-window decision is a ``VoiceEdge`` (the earliest sign of speech, one window in).

The weights ship inside the ``silero-vad`` package; we load the TorchScript file directly, without
importing the package (whose import sets torch to one thread for the whole process).
"""

from __future__ import annotations

import importlib.util
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duplex.clock import now
from duplex.config import AgentConfig
from duplex.errors import ModelNotFoundError
from duplex.events import SpeechStarted, SpeechStopped, VADEvent, VoiceEdge
from duplex.engine.scheduler import Scheduler

PROBS_KEPT = 3000  # windows of probability kept for inspection (96 s): bounded, however long a session runs

WINDOW = 512  # samples per Silero window at 16 kHz
CONTEXT = 64  # samples of the previous window prefixed to each window
STATE_SHAPE = (2, 128)  # recurrent state per stream: [2, B, 128] when batched


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
    windows: np.ndarray  # [N, CONTEXT + WINDOW] float32
    state: np.ndarray  # [2, 128] float32
    peek: np.ndarray | None = None  # [CONTEXT + WINDOW]: the newest audio, scored from the final state, not kept


@dataclass
class VADStreamState:
    """What one session's VAD carries between packets."""

    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    state: np.ndarray = field(default_factory=lambda: np.zeros(STATE_SHAPE, np.float32))
    scored: int = 0  # samples scored so far
    speaking: bool = False
    speech_start: int = 0
    run_start: int | None = None  # start of the current run that may flip the state
    recent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # the newest CONTEXT + WINDOW samples
    peek_voiced: bool = False  # a peek found voice the next whole window has not judged yet


class SileroVAD:
    """The VAD model: one Silero network shared by all sessions through a batching worker."""

    def __init__(self, settings: VADSettings | None = None, device: str = "cpu", max_batch: int = 64) -> None:
        import torch

        self.settings = settings or VADSettings()
        self.device = device
        self._net = torch.jit.load(str(silero_jit_path()), map_location=device)._model.eval()
        # TorchScript profiles its first calls (about 80 ms each) per input shape: pay that at load,
        # not in the first second of a conversation.
        with torch.no_grad():
            for batch in (1,) * 8 + (2,) * 4:
                self._net(torch.zeros(batch, CONTEXT + WINDOW), torch.zeros(2, batch, STATE_SHAPE[1]))
        self.worker: Scheduler[_Request, tuple[np.ndarray, np.ndarray, float | None]] = Scheduler(
            "vad", self._step, device=device, max_batch=max_batch)

    def new_stream(self) -> SileroVADStream:
        return SileroVADStream(self)

    def _step(self, requests: Sequence[_Request]) -> list[tuple[np.ndarray, np.ndarray, float | None]]:
        """Score the windows of many streams, window by window in lockstep, then their peeks (from
        each stream's final state, which a peek does not change), on the worker thread."""
        import torch

        probs = [np.zeros(len(r.windows), np.float32) for r in requests]
        states = [r.state for r in requests]
        peeks: list[float | None] = [None] * len(requests)
        for k in range(max(len(r.windows) for r in requests)):
            live = [i for i, r in enumerate(requests) if k < len(r.windows)]
            x = torch.from_numpy(np.stack([requests[i].windows[k] for i in live])).to(self.device)  # [B, 576]
            h = torch.from_numpy(np.stack([states[i] for i in live], axis=1)).to(self.device)  # [2, B, 128]
            out, h = self._net(x, h)
            out, h = out.float().cpu().numpy(), h.float().cpu().numpy()
            for j, i in enumerate(live):
                probs[i][k] = out[j, 0]
                states[i] = h[:, j]
        looking = [i for i, r in enumerate(requests) if r.peek is not None]
        if looking:
            x = torch.from_numpy(np.stack([r.peek for r in requests if r.peek is not None])).to(self.device)
            h = torch.from_numpy(np.stack([states[i] for i in looking], axis=1)).to(self.device)
            out, _ = self._net(x, h)
            for j, i in enumerate(looking):
                peeks[i] = float(out[j, 0])
        return list(zip(probs, states, peeks))


class SileroVADStream:
    """One session's VAD (see :class:`VADStreamState`)."""

    def __init__(self, model: SileroVAD) -> None:
        self.model = model
        self.s = VADStreamState()
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
        probs, s.state, p = await self.model.worker.submit(_Request(windows, s.state, s.recent.copy() if look else None))
        events = self._detect(probs)
        if p is not None and p >= self.model.settings.threshold and not self._voiced():
            s.peek_voiced = True
            end = s.scored + len(s.pending)
            events.append(VoiceEdge(stream_samples=end, wall=now(), at=end - WINDOW, voiced=True))
        return events

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
        self.s = VADStreamState()


def build_vad(config: AgentConfig, device: str) -> SileroVAD:
    """The VAD for every profile: real Silero (it is small; CPU is fine even beside a GPU)."""
    return SileroVAD(device="cpu")
