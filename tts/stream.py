"""The TTS stage: :class:`CsmTTS` (the model, shared by sessions) and :class:`CsmTTSStream` (one per session).

``synthesize`` speaks one reply. A reader task pulls the LLM's text pieces as they come (so the LLM
keeps running while the agent speaks) and cuts them into segments (:mod:`duplex.tts.segmenter`);
the reply loop takes the next segment (merging any that queued up), runs its text into the reply's
row (the new segments of every reply waiting run as one prefill pass per tick:
:meth:`~duplex.tts.engine.CsmEngine.begin_segments`), then joins the engine's batched frame step as
a row (:mod:`duplex.engine.scheduler`): every tick makes one frame for every reply being spoken and
decodes it to audio in the same step. An :class:`~duplex.stages.AudioChunk` is yielded whenever a
chunk of ``chunk_frames`` frames is decoded. The row's deadline is when its audio would run dry (the time of
its first chunk plus the audio made since), so when more replies are ready than one step holds, the
one closest to a gap goes first, and a new reply (no audio yet) counts as due now. Closing the
iterator or cancelling its consumer stops it between two frames: at most the frame already being
computed finishes, and the reply's row is given back, so the model stays usable.

The voice of a reply is the stream's own voice prompt, else the model's (``config.voice``); with
neither, the stream keeps the voice its first segment came out in, by using that segment as the
prompt of its later replies (CSM otherwise picks a new voice for every reply).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplex.clock import now
from duplex.engine.ahead import RunAhead
from duplex.engine.scheduler import Output, Scheduler
from duplex.stages import AudioChunk, VoicePrompt
from duplex.tts.engine import CsmEngine, FrameLaunch, Reply, SegmentStart, Voice
from duplex.tts.segmenter import Segmenter, SegmenterConfig
from duplex.tts.timing import TYPICAL_FRAMES_PER_CHAR, WordTimer
from duplex.tts.voice import check_voice


@dataclass
class TTSSettings:
    chunk_frames: int = 2  # codec frames per decode call (12.5 frames a second)
    seed: int = 0  # reply n of a stream samples with seed + n
    min_seconds: float = 1.0  # a segment stops after min_seconds + seconds_per_char * characters ...
    seconds_per_char: float = 0.15  # ... if the model has not ended it (about 2.5x normal speech)
    fixed_frames: int | None = None  # speak exactly this many frames per segment, ignoring its end (benchmarks)
    keep_first_voice: bool = True  # with no voice prompt, a stream keeps the voice its first segment came out in
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_frames <= 50:
            raise ValueError(f"chunk_frames must be in 1..50, got {self.chunk_frames}")


_END = object()  # the text ended
FRAMES_AHEAD = 2  # frames a reply may have made before its reader takes them, when frames run ahead (else 1)


class CsmTTS:
    """A CSM + Mimi TTS model (the :class:`~duplex.stages.TTSModel` of the real profiles)."""

    def __init__(self, engine: CsmEngine, *, device: str = "cpu", settings: TTSSettings | None = None,
                 voice: VoicePrompt | None = None, ahead: bool | None = None) -> None:
        self.engine = engine
        self.device = device
        self.settings = settings or TTSSettings()
        self.sample_rate = engine.sample_rate
        # each tick launches the next frame of the replies that go on before it returns (the next
        # input stays on the device), so the device runs it while the host hands the audio over
        # (``ahead``; by default on a GPU: on the CPU a step runs as it is launched)
        self.run_ahead: RunAhead = RunAhead(self._launch, engine.collect_frames, self._book,
                                            _steppable,
                                            closed=RuntimeError("step on a closed reply or outside a segment"))
        on = str(device).startswith("cuda") if ahead is None else ahead
        self.scheduler: Scheduler = Scheduler("tts", self.run_ahead.step, device=device, max_batch=engine.slots,
                                              job_budget=2, ahead=self.run_ahead.hooks if on else None)
        # every reply's new segment of text waiting, in one prefill pass per tick
        self.segments = self.scheduler.coalesce(engine.begin_segments)
        self.voice: Voice | None = None
        if voice is not None:  # at build time, off the event loop
            self.voice = self.engine.encode_voice(check_voice(voice, self.sample_rate), " ".join(voice.text.split()))
            if self.engine.device.type == "cuda":  # made on this thread's stream, used on the worker's
                import torch

                torch.cuda.synchronize(self.engine.device)

    def new_stream(self) -> CsmTTSStream:
        return CsmTTSStream(self)

    async def warm_up(self, progress=None) -> None:
        """Capture the frame step for every batch bucket (CUDA graphs; nothing on the CPU), on the
        engine's own thread, before the first session needs it."""
        await self.scheduler.run(self.engine.capture, progress)

    def _launch(self, replies: list[Reply]) -> FrameLaunch | None:
        """Launch one frame step of those ``replies`` inside a segment (worker thread, not waiting)."""
        live = [reply for reply in replies if _steppable(reply)]
        return self.engine.launch_frames(live) if live else None

    def _book(self, launched: FrameLaunch, out: Any) -> list[Output | None]:
        """Commit the frames (a reply released meanwhile: its step is void)."""
        live = [reply for reply in launched.states if not reply.closed]
        made = self.engine.book_frames(live, out)
        steps = dict(zip(map(id, live), made))
        outputs: list[Output | None] = []
        for reply in launched.states:
            step = steps.get(id(reply))
            outputs.append(None if step is None else Output(step, done=step.done))
        return outputs

    async def encode_voice(self, prompt: VoicePrompt) -> Voice:
        """Validate and encode a voice prompt (on the worker thread)."""
        pcm = check_voice(prompt, self.sample_rate)
        return await self.scheduler.run(self.engine.encode_voice, pcm, " ".join(prompt.text.split()))

    async def set_voice(self, prompt: VoicePrompt | None) -> None:
        """Set the default voice of every stream that has none of its own (None: the model's own voice)."""
        self.voice = None if prompt is None else await self.encode_voice(prompt)

    async def aclose(self) -> None:
        await self.scheduler.aclose()

    def close(self) -> None:
        self.scheduler.close()


class CsmTTSStream:
    """One session's TTS: speaks replies one at a time, in the session's voice."""

    def __init__(self, model: CsmTTS) -> None:
        self.model = model
        self.sample_rate = model.sample_rate
        self.voice: Voice | None = None  # this session's own voice, if set
        self.replies = 0
        self.last_reply: Reply | None = None

    async def set_voice(self, prompt: VoicePrompt | None) -> None:
        """Speak in the voice of ``prompt`` from the next reply on (None: the model's default, or with no
        default the voice the next reply's first segment comes out in)."""
        self.voice = None if prompt is None else await self.model.encode_voice(prompt)

    def last_codes(self):
        """The codec frames of the last reply, ``[T, K]`` (CPU), or None before the first."""
        import torch

        if self.last_reply is None or not self.last_reply.frames:
            return None
        return torch.stack(self.last_reply.frames).cpu()

    async def synthesize(self, text: AsyncIterator[str]) -> AsyncGenerator[AudioChunk, None]:
        """Speak one reply: text pieces in, audio chunks (with their words) out as soon as they are made."""
        engine, scheduler, settings = self.model.engine, self.model.scheduler, self.model.settings
        seed = settings.seed + self.replies
        self.replies += 1
        voice = self.voice if self.voice is not None else self.model.voice
        queue: asyncio.Queue[Any] = asyncio.Queue()  # segments of text: a few short strings at most
        reader = asyncio.create_task(_read_segments(text, Segmenter(settings.segmenter), queue),
                                     name="tts-text-reader")
        held: deque[Any] = deque()
        room = FRAMES_AHEAD if scheduler.ahead is not None else 1  # frames made before the reader takes them
        rate = voice.frames / max(len(voice.text), 1) if voice is not None else TYPICAL_FRAMES_PER_CHAR
        timer = WordTimer(engine.frame_size, frames_per_char=rate)
        reply: Reply | None = None
        row = None
        offset = 0
        first_audio: float | None = None  # when this reply's first chunk came out (its playback start)
        try:
            while True:
                segment = await _next_segment(queue, held, settings.segmenter.max_words)
                if segment is _END:
                    break
                if reply is None:
                    reply = await scheduler.run(engine.new_reply, voice, seed, settings.chunk_frames,
                                                undo=engine.release)
                    self.last_reply = reply
                frames = settings.fixed_frames or math.ceil(
                    engine.frame_rate * (settings.min_seconds + settings.seconds_per_char * len(segment)))
                await self.model.segments.submit(SegmentStart(reply, segment, frames, settings.fixed_frames is None))
                timer.begin_segment(segment, offset)
                row = scheduler.join(reply, deadline=_run_dry(first_audio, offset, self.sample_rate), room=room)
                done = False
                while not done:
                    step = (await scheduler.next(row)).value
                    done = step.done
                    pcm = step.pcm if step.pcm is not None else np.zeros(0, np.float32)
                    if len(pcm) and first_audio is None:
                        first_audio = now()
                    offset += len(pcm)
                    row.deadline = _run_dry(first_audio, offset, self.sample_rate)
                    words = timer.advance(offset, done)
                    if len(pcm) or words:  # an empty chunk only to release a segment's last words
                        yield AudioChunk(pcm, tuple(words))
                row = None
                if voice is None and self.voice is None and self.model.voice is None and settings.keep_first_voice:
                    self.voice = await scheduler.run(_voice_of, reply.history[-1], engine)
            if reply is not None:  # done (no step in flight): free its row and codec state, keep its frames
                done_reply, reply = reply, None
                await scheduler.run(engine.release, done_reply)
        finally:
            if row is not None:
                scheduler.leave(row)  # a frame in flight lands; no other starts
            if reply is not None:  # free its row and codec state (after any step in flight); keep its frames
                try:
                    scheduler.run(engine.release, reply)
                except RuntimeError:  # the engine is closed
                    pass
            reader.cancel()
            await asyncio.wait([reader])  # never leaves the reader running on the caller's iterator

    async def aclose(self) -> None:
        self.last_reply = None


def _steppable(reply: Reply) -> bool:
    """Whether a reply can take a frame step: open, inside a segment whose input is staged."""
    return reply.active and reply.staged


def _run_dry(first_audio: float | None, samples: int, rate: int) -> float:
    """When a reply's audio runs out if played from its first chunk on (now, before any audio)."""
    return now() if first_audio is None else first_audio + samples / rate


def _voice_of(record, engine: CsmEngine) -> Voice | None:
    """A finished segment as the voice prompt of later replies (long enough to carry a voice)."""
    import torch

    seconds = len(record.frames) / engine.frame_rate
    if not 1.5 <= seconds <= 20.0:
        return None
    return Voice(text=record.text, codes=torch.stack(record.frames).to(engine.device))


async def _read_segments(text: AsyncIterator[str], segmenter: Segmenter, queue: asyncio.Queue[Any]) -> None:
    """Pull text pieces as they come and queue the segments they complete; then ``_END``."""
    try:
        async for piece in text:
            for segment in segmenter.push(piece):
                queue.put_nowait(segment)
        for segment in segmenter.flush():
            queue.put_nowait(segment)
        queue.put_nowait(_END)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the text source failed: the reply loop raises it
        queue.put_nowait(exc)


async def _next_segment(queue: asyncio.Queue[Any], held: deque[Any], max_words: int) -> Any:
    """The next text to speak: the next segment, merged with those already waiting (up to ``max_words``)."""
    item = held.popleft() if held else await queue.get()
    if isinstance(item, BaseException):
        raise item
    if item is _END:
        return item
    parts, words = [item], len(item.split())
    while not queue.empty():
        nxt = queue.get_nowait()
        if nxt is _END or isinstance(nxt, BaseException) or words + len(nxt.split()) > max_words:
            held.append(nxt)
            break
        parts.append(nxt)
        words += len(nxt.split())
    return " ".join(parts)
