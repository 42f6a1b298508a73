"""``duplex mic``: a session at this machine's microphone and speaker, with an echo guard.

:class:`MicLink` joins a Session to an :class:`AudioDevice` (a full-duplex sound card that calls back
once per 20 ms block from its own thread: :class:`~.devices.SoundDeviceAudio`, or a simulated room in
the tests):

- speaker: the session's 20 ms frames, resampled to the device rate and cut into device blocks, wait
  in a short queue that the callback drains (``prebuffer`` blocks of slack for the two clocks); at a
  barge-in what waits there is taken back (a live output: see ``Session.audio``), so the agent
  stops after the device's own output latency;
- reference: the callback keeps what it wrote and hands each microphone block the speaker audio that
  was written ``device.latency_s`` earlier, i.e. what is coming back through the room right now;
- microphone: each block and its reference, resampled to 16 kHz alike, go through the
  :class:`~.echo.EchoGuard`, then to ``session.push_audio``.

So the agent's own voice never reaches the VAD as speech, and it cannot interrupt itself. The queue
depth plus the device's output latency is reported as ``session.output_latency_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from duplex import events as ev
from duplex.audio import StreamResampler
from duplex.config import AgentConfig
from duplex.events import INPUT_RATE
from duplex.session import Session
from duplex.transport.echo import BLOCK, EchoGuard

log = logging.getLogger(__name__)

# The reference is aligned this much early, so the echo never precedes it even where the device
# reports 40 ms more latency than it has; AEC3 finds the delay left (it cancels an echo 200 ms late).
SAFETY_S = 0.04


class AudioDevice(Protocol):
    rate: int
    block: int  # samples per callback (20 ms)
    latency_s: float  # from writing a speaker sample to capturing its echo (output + input latency)
    output_latency_s: float  # from writing a speaker sample to hearing it

    def start(self, callback: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Call ``callback(mic_block, speaker_block_to_fill)`` every block, from any thread."""

    def stop(self) -> None: ...


class MicLink:
    """Moves audio between ``session`` and ``device`` (see the module docstring)."""

    def __init__(self, session: Session, device: AudioDevice, guard: EchoGuard | None = None,
                 prebuffer: int = 2, queue_blocks: int = 10) -> None:
        self.session, self.device = session, device
        self.guard = guard
        self.prebuffer = prebuffer
        self.speaker: deque[np.ndarray] = deque(maxlen=queue_blocks)  # device blocks to play
        self._made: deque[object] = deque(maxlen=queue_blocks)  # the resampler's state after each block
        self._playing = False  # the callback drains the queue; False until `prebuffer` blocks wait
        self._resampler: StreamResampler | None = None
        self._history: np.ndarray | None = None  # what the speaker was given, latency_s of it + a block
        self._mic_q: asyncio.Queue[tuple[np.ndarray, np.ndarray]] = asyncio.Queue(maxsize=250)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.underruns = 0
        self.overflows = 0
        self.lost_input = 0

    # -- device thread -----------------------------------------------------------------------------

    def on_block(self, mic: np.ndarray, speaker: np.ndarray) -> None:
        if not self._playing and len(self.speaker) >= self.prebuffer:
            self._playing = True
        if self._playing:
            try:
                speaker[:] = self.speaker.popleft()
            except IndexError:
                speaker[:] = 0
                self._playing = False
                self.underruns += 1
        else:
            speaker[:] = 0
        n = len(speaker)
        if self._history is None:  # the device knows its latency once its stream is open
            delay = max(0, int(round((self.device.latency_s - SAFETY_S) * self.device.rate)))
            self._history = np.zeros(delay + n, np.float32)
        self._history = np.concatenate([self._history[n:], speaker])
        ref = self._history[:n].copy()  # written device.latency_s ago: its echo is in `mic` now
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._put_mic, mic.astype(np.float32, copy=True), ref)

    def _put_mic(self, mic: np.ndarray, ref: np.ndarray) -> None:
        if self._mic_q.full():
            self._mic_q.get_nowait()
            self.lost_input += 1
        self._mic_q.put_nowait((mic, ref))

    # -- event loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the session closes (or this task is cancelled); the device is stopped on exit."""
        self._loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(self._play(), name=f"{self.session.name}-speaker"),
                 asyncio.create_task(self._listen(), name=f"{self.session.name}-microphone")]
        self.device.start(self.on_block)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.device.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _play(self) -> None:
        dev = self.device
        resampler = self._resampler = StreamResampler(self.session.output_rate, dev.rate)
        fifo = np.zeros(0, np.float32)
        frames = self.session.audio(maxsize=25, live=True)
        frames.take_back = self._take_back
        async for frame in frames:
            fifo = np.concatenate([fifo, resampler(frame)])
            if len(fifo) < dev.block:  # the resampler's uneven start: pad once, in front
                fifo = np.concatenate([np.zeros(dev.block - len(fifo), np.float32), fifo])
            block, fifo = fifo[:dev.block], fifo[dev.block:]
            if len(self.speaker) == self.speaker.maxlen:
                self.overflows += 1  # the device runs slower than the session: drop the oldest
            self.speaker.append(block)
            self._made.append(resampler.state())
            self.session.output_latency_s = round(dev.output_latency_s + len(self.speaker) * 0.02, 4)

    def _take_back(self) -> int:
        """At a barge-in: the blocks waiting for the device will not be heard, but one: it plays
        while the session's next frame (its 10 ms fade-out, going on from the end of that block)
        arrives, so the speaker never stops mid-wave. The others go (newest first, one atomic pop at
        a time: the device thread takes from the other end) and play again on resume."""
        taken = 0
        while len(self.speaker) > 1:
            try:
                self.speaker.pop()
            except IndexError:  # the device took the last one meanwhile
                break
            self._made.pop()
            taken += 1
        if taken and self._made and self._resampler is not None:  # the frames given back are resampled again from where the kept block ended
            self._resampler.restore(self._made[-1])
        return taken

    async def _listen(self) -> None:
        dev = self.device
        to16_mic, to16_ref = StreamResampler(dev.rate, INPUT_RATE), StreamResampler(dev.rate, INPUT_RATE)
        mic_buf, ref_buf = np.zeros(0, np.float32), np.zeros(0, np.float32)
        while not self.session.closed:
            mic, ref = await self._mic_q.get()
            # Same resampler settings and block sizes: the two stay sample-aligned.
            mic_buf = np.concatenate([mic_buf, to16_mic(mic)])
            ref_buf = np.concatenate([ref_buf, to16_ref(ref)])
            n = (min(len(mic_buf), len(ref_buf)) // BLOCK) * BLOCK
            if n == 0:
                continue
            out = [self._guarded(mic_buf[i:i + BLOCK], ref_buf[i:i + BLOCK]) for i in range(0, n, BLOCK)]
            mic_buf, ref_buf = mic_buf[n:], ref_buf[n:]
            if not self.session.closed:
                self.session.push_audio(np.concatenate(out), INPUT_RATE)

    def _guarded(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return mic if self.guard is None else self.guard.process(mic, ref)


async def talk(session: Session, device: AudioDevice, *, guard: bool = True,
               stop: asyncio.Event | None = None) -> MicLink:
    """Run ``session`` on ``device`` until ``stop`` is set or the session ends; then close the session."""
    link = MicLink(session, device, EchoGuard() if guard else None)
    task = asyncio.create_task(link.run(), name=f"{session.name}-mic")
    waiters = [task] + ([asyncio.create_task(stop.wait())] if stop is not None else [])
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waiters:
            t.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        await session.close()
    failure = next((r for r in results if isinstance(r, Exception)), None)
    if failure is not None:  # e.g. the sound card could not be opened
        raise failure
    return link


def _print_event(event: ev.Event) -> None:
    if isinstance(event, ev.TranscriptFinal) and event.text:
        print(f"  you: {event.text}", flush=True)
    elif isinstance(event, ev.ReplyDone):
        cut = f"  [interrupted; you heard: {event.heard!r}]" if event.interrupted else ""
        print(f"agent: {event.text}{cut}", flush=True)
    elif isinstance(event, ev.Metric) and event.name == "voice_to_voice_s":
        print(f"       (answered {event.value * 1000:.0f} ms after you stopped)", flush=True)
    elif isinstance(event, ev.Error):
        print(f"error: {event.stage}: {event.message}", flush=True)


async def run_mic(config: AgentConfig, input_device: int, output_device: int, *,
                  record: str | None = None) -> None:
    """``duplex mic``: load the agent, talk until Ctrl-C, write the record if asked."""
    from duplex.agent import Agent
    from duplex.transport.cli import _stop_on_signals
    from duplex.transport.devices import SoundDeviceAudio

    device = SoundDeviceAudio(input_device, output_device)
    agent = await Agent.load(config)
    stop = asyncio.Event()
    try:
        session = agent.session(record=record)
        events = session.events()

        async def show() -> None:
            async for event in events:
                _print_event(event)

        shower = asyncio.create_task(show())
        print(f"duplex mic: listening at {device.rate} Hz (profile {config.profile}); talk, Ctrl-C stops",
              flush=True)
        with _stop_on_signals(stop):
            await talk(session, device, stop=stop)
        await shower
        if record is not None:
            print(f"duplex mic: wrote {Path(record) / 'audio.wav'}, transcript.json, events.jsonl and "
                  "conversation.json", flush=True)
    finally:
        await agent.aclose()
