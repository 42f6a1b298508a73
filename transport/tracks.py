"""Audio between aiortc and a Session: the agent's voice as an outgoing track, the microphone in.

Outgoing: :class:`AgentAudioTrack` reads the session's 20 ms frames (paced by the session, silence
when idle, nothing left over after a barge-in) and hands them to aiortc's sender as 48 kHz s16 mono
frames, resampled with the project's stateful streaming resampler. aiortc encodes and sends each frame
as soon as ``recv`` returns it, so the session's pace is the wire's pace.

Incoming: :func:`frame_to_pcm` turns one decoded frame into ``[samples, channels]`` int16 whatever
its layout (aiortc's Opus decoder gives packed stereo s16 at 48 kHz; a planar frame comes as
``[channels, samples]``), and :func:`pump_microphone` feeds a remote track into the session.
"""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from duplex.audio import StreamResampler, to_int16, to_mono_float
from duplex.session import Session

WIRE_RATE = 48_000  # Opus in WebRTC runs at 48 kHz


def frame_to_pcm(frame) -> tuple[np.ndarray, int]:
    """A decoded ``av.AudioFrame`` as ``([samples, channels] array, sample_rate)``, layout checked."""
    channels = len(frame.layout.channels)
    data = frame.to_ndarray()
    if frame.format.is_planar:
        assert data.shape[0] == channels, f"planar frame of shape {data.shape} for {channels} channels"
        pcm = data.T  # [C, T] -> [T, C]
    else:
        assert data.shape[0] == 1 and data.shape[1] == frame.samples * channels, \
            f"packed frame of shape {data.shape} for {frame.samples} samples x {channels} channels"
        pcm = data.reshape(frame.samples, channels)  # interleaved L R L R ... -> [T, C]
    return np.ascontiguousarray(pcm), int(frame.sample_rate)


@dataclass
class InputStats:
    """What came in from the peer's microphone (for the status endpoint and tests)."""

    frames: int = 0
    seconds: float = 0.0
    peak_rms: float = 0.0  # the loudest 20 ms block, full scale 1.0
    layout: str = ""
    first_loud_wall: float | None = None  # when the first block above -30 dBFS arrived (loop clock)


async def pump_microphone(track, session: Session, stats: InputStats, idle_timeout_s: float,
                          first_timeout_s: float = 15.0, stopped: Callable[[], bool] = lambda: False) -> str:
    """Feed ``track``'s frames to ``session`` until the track ends, the session closes, ``stopped()``
    says so, or no frame comes for ``idle_timeout_s`` (a peer that vanished without closing; a browser
    sends frames all the time, silence and a muted track included). The first frame may take
    ``first_timeout_s`` (the connection is still being set up). Returns why it stopped.

    ``stopped`` is checked after every frame because a cancellation can be lost: before Python 3.12,
    ``asyncio.wait_for`` swallows a cancel that arrives as its inner call completes (CPython
    gh-86296), and frames complete that call every 20 ms."""
    from aiortc.mediastreams import MediaStreamError

    while not session.closed and not stopped():
        timeout = idle_timeout_s if stats.frames else first_timeout_s
        try:
            frame = await asyncio.wait_for(track.recv(), timeout)
        except MediaStreamError:
            return "track ended"
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
            return f"no audio for {timeout:g} s"
        pcm, rate = frame_to_pcm(frame)
        stats.frames += 1
        stats.seconds += pcm.shape[0] / rate
        stats.layout = f"{frame.format.name} {frame.layout.name} {rate} Hz"
        block = to_mono_float(pcm, rate)  # the one conversion: push_audio takes it as is
        rms = float(np.sqrt(np.mean(block * block))) if block.size else 0.0
        stats.peak_rms = max(stats.peak_rms, rms)
        if stats.first_loud_wall is None and rms > 0.03:
            stats.first_loud_wall = asyncio.get_running_loop().time()
        if session.closed or stopped():
            break
        session.push_audio(block, rate)
    return "session closed"


def agent_audio_track(session: Session, *, queue_frames: int = 10):
    """The session's ``audio()`` as an aiortc ``MediaStreamTrack`` of 20 ms frames at 48 kHz.

    ``queue_frames`` bounds the frames waiting between the session and aiortc's sender (a live
    output: at a barge-in the session takes back what waits, so it is never heard). aiortc sends a
    frame as soon as ``recv`` returns it, so the queue is empty unless the sender stalls (silence it
    fell behind on is skipped, not sent in a burst that a browser's jitter buffer would take for
    network jitter and answer with a longer delay for seconds, barge-ins included); if it
    falls further behind than that, the oldest are dropped (counted in ``dropped``) rather than
    delaying the voice from then on. The resampler (24 -> 48 kHz, integer ratio) gives each frame
    whole, under 1 ms late; the FIFO only evens out a rate whose ratio is not whole."""
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    wire_frame = WIRE_RATE // 50

    class AgentAudioTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.frames = session.audio(maxsize=queue_frames, live=True)
            self.resampler = StreamResampler(session.output_rate, WIRE_RATE)
            self.fifo = np.zeros(0, np.float32)  # resampled audio not yet sent, at 48 kHz
            self.time_base = fractions.Fraction(1, WIRE_RATE)
            self.pts = 0
            self.sent_frames = 0
            self.voiced_frames = 0  # frames carrying agent audio

        @property
        def dropped(self) -> int:
            return self.frames.dropped

        def buffered_s(self) -> float:
            """Seconds of agent audio taken from the session but not yet on the wire."""
            return self.frames.queued() * 0.02 + len(self.fifo) / WIRE_RATE

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            try:
                pcm = await anext(self.frames)  # float32 [20 ms] at session.output_rate
                while not pcm.any() and self.frames.queued():  # silence the sender fell behind on:
                    pcm = await anext(self.frames)  # skip it rather than burst it (e.g. before ICE was up)
            except StopAsyncIteration:
                self.stop()
                raise MediaStreamError from None
            if pcm.any():
                self.voiced_frames += 1
            self.fifo = np.concatenate([self.fifo, self.resampler(pcm)])
            if len(self.fifo) < wire_frame:
                self.fifo = np.concatenate([np.zeros(wire_frame - len(self.fifo), np.float32), self.fifo])
            out, self.fifo = self.fifo[:wire_frame], self.fifo[wire_frame:]
            frame = av.AudioFrame.from_ndarray(to_int16(out)[None, :], format="s16", layout="mono")
            frame.sample_rate = WIRE_RATE
            frame.pts = self.pts
            frame.time_base = self.time_base
            self.pts += wire_frame
            self.sent_frames += 1
            return frame

    return AgentAudioTrack()
