"""A session's input side: the user's audio as pushed, made 16 kHz mono, timed and queued for the models.

:class:`Intake` owns everything about the audio before a model sees it: the conversion of any rate
and layout (:func:`duplex.audio.to_mono_float`, a streaming resampler), the count of samples
received (the stream clock every event is stamped on), when each block arrived (so a stream sample
maps back to the wall time it was spoken), and the two queues the VAD and the ASR read from, with
the backlog each holds. When the models fall more than ``MAX_QUEUED_S`` behind, input is dropped
until the backlog is down to ``RESUME_QUEUED_S``: one episode is two messages (start; end with the
seconds dropped), never one per block.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable

import numpy as np

from duplex.audio import StreamResampler, to_mono_float
from duplex.clock import now
from duplex.errors import AudioFormatError
from duplex.events import INPUT_RATE
from duplex.recording import MAX_EXTRAPOLATION_S

MIN_RATE, MAX_RATE = 8_000, 192_000
MAX_QUEUED_S = 10.0  # audio waiting for a lagging VAD/ASR before input is dropped ...
RESUME_QUEUED_S = 5.0  # ... until the backlog is down to this
ARRIVALS_KEPT = 60_000  # blocks whose arrival time is kept (10-20 minutes: lookups are for recent speech)
ENDPOINT = object()  # marker in the ASR queue: the VAD heard the end of speech here


class Intake:
    """The user's audio from :meth:`push` to the VAD's and the ASR's queues."""

    def __init__(self, on_overload: Callable[[str], None]) -> None:
        self._on_overload = on_overload  # told when dropping starts and when it ends
        self._resampler: StreamResampler | None = None
        self.pushed = 0  # input samples (16 kHz) handed to the models: the stream clock
        self._arrival_ends: list[int] = []  # stream sample at the end of each pushed block ...
        self._arrival_walls: list[float] = []  # ... and when it arrived
        self.queues: dict[str, asyncio.Queue[object]] = {"vad": asyncio.Queue(), "asr": asyncio.Queue()}
        self._queued_s = {"vad": 0.0, "asr": 0.0}  # seconds of audio waiting in each queue
        self._dropped_s = 0.0  # input dropped in the overload going on now
        self.dropped_input_s = 0.0  # ... and in earlier ones

    def push(self, pcm: np.ndarray, sample_rate: int) -> np.ndarray | None:
        """Convert, time and queue one block of user audio; returns it at 16 kHz (None: nothing to
        queue, the resampler is still filling or the models are too far behind). Raises
        :class:`~duplex.errors.AudioFormatError` for audio that cannot be used."""
        if isinstance(sample_rate, (int, np.integer)) and not (MIN_RATE <= sample_rate <= MAX_RATE):
            raise AudioFormatError(f"sample rate {sample_rate} Hz is not supported; give audio at "
                                   f"{MIN_RATE}-{MAX_RATE} Hz (16000 or 48000 are typical)")
        mono = to_mono_float(pcm, sample_rate)
        if mono.size == 0:
            raise AudioFormatError("empty audio block: push at least one sample")
        if self._resampler is None or self._resampler.in_rate != sample_rate:
            self._resampler = StreamResampler(sample_rate, INPUT_RATE)
        block = self._resampler(mono)
        if block.size == 0:
            return None
        lag = self.lag_s
        limit = RESUME_QUEUED_S if self._dropped_s else MAX_QUEUED_S  # hysteresis: one episode, not a flicker
        if lag > limit:
            if self._dropped_s == 0.0:
                self._on_overload(f"the models are {lag:.1f} s behind the audio; dropping input until they catch up")
            self._dropped_s += block.size / INPUT_RATE
            return None
        if self._dropped_s:
            self._on_overload(f"dropped {self._dropped_s:.1f} s of input while the models were behind")
            self.dropped_input_s += self._dropped_s
            self._dropped_s = 0.0
        self.pushed += block.size
        self._arrival_ends.append(self.pushed)
        self._arrival_walls.append(now())
        if len(self._arrival_ends) > ARRIVALS_KEPT:
            del self._arrival_ends[:ARRIVALS_KEPT // 2], self._arrival_walls[:ARRIVALS_KEPT // 2]
        for key, queue in self.queues.items():
            self._queued_s[key] += block.size / INPUT_RATE
            queue.put_nowait(block)
        return block

    def consumed(self, key: str, samples: int) -> None:
        """The ``key`` model ("vad" or "asr") has taken ``samples`` of its queue."""
        self._queued_s[key] -= samples / INPUT_RATE

    @property
    def lag_s(self) -> float:
        """Seconds of input audio waiting for the VAD or the ASR (0 when the models keep up)."""
        return max(self._queued_s.values())

    def arrival(self, sample: int) -> float:
        """The wall time at which input stream sample ``sample`` was spoken (arrived)."""
        i = bisect.bisect_left(self._arrival_ends, sample)
        if i >= len(self._arrival_ends):
            return now()
        return self._arrival_walls[i] - (self._arrival_ends[i] - sample) / INPUT_RATE

    def stream_now(self) -> float:
        """Where the input stream stands now, in its samples: what was received, plus the time since
        its last block arrived (at most MAX_EXTRAPOLATION_S: a paused source stops the clock)."""
        if not self._arrival_walls:
            return 0.0
        since = min(max(0.0, now() - self._arrival_walls[-1]), MAX_EXTRAPOLATION_S)
        return self.pushed + since * INPUT_RATE
