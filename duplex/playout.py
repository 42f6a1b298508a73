"""The agent's output buffer: reply audio waiting for the speaker, cut into 20 ms frames.

One reply plays at a time. Audio of any other reply id is refused at the door, and :meth:`drop`
clears the buffer at once, so output of a cancelled reply can never reach the speaker. The buffer is
bounded (``capacity_s``): a TTS running ahead of playback waits in :meth:`Playout.put`. The session
pulls one frame per 20 ms tick with :meth:`Playout.next_frame`; the count of reply samples played is
the playback position the conversation record cuts interrupted replies at.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    pcm: np.ndarray  # [frame_samples] float32 at the output rate
    reply_id: int | None  # the reply this frame carries audio of, None for silence
    played: int  # reply samples played after this frame
    finished: bool  # this frame ends the reply


class Playout:
    def __init__(self, sample_rate: int, frame_ms: int = 20, capacity_s: float = 2.0) -> None:
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * frame_ms // 1000
        self.capacity = int(capacity_s * sample_rate)
        self.active: int | None = None
        self.paused = False
        self.held = False  # a speculative reply: its audio waits until released
        self.played = 0
        self.underruns = 0  # frames of silence inside a reply because audio came too late
        self._chunks: deque[np.ndarray] = deque()
        self._buffered = 0
        self._generation_done = False
        self._space = asyncio.Event()
        self._space.set()
        self._silence = np.zeros(self.frame_samples, np.float32)

    @property
    def buffered(self) -> int:
        return self._buffered

    def start_reply(self, reply_id: int, *, held: bool = False) -> None:
        """Take the audio of ``reply_id`` from now on (``held``: keep it back until :meth:`release`)."""
        self.drop()
        self.active, self.played, self._generation_done, self.held = reply_id, 0, False, held

    def release(self, reply_id: int) -> None:
        """The held reply is committed: it plays from the next frame on."""
        if self.active == reply_id:
            self.held = False

    async def put(self, reply_id: int, pcm: np.ndarray) -> bool:
        """Queue reply audio; waits while the buffer is full. False if the reply is no longer playing."""
        while self.active == reply_id and self._buffered >= self.capacity:
            self._space.clear()
            await self._space.wait()
        if self.active != reply_id:
            return False
        if len(pcm):
            self._chunks.append(pcm.astype(np.float32, copy=False))
            self._buffered += len(pcm)
        return True

    def end_reply(self, reply_id: int) -> None:
        """All audio of the reply has been queued."""
        if self.active == reply_id:
            self._generation_done = True

    def drop(self) -> None:
        """Forget the playing reply and everything queued for it (barge-in)."""
        self._chunks.clear()
        self._buffered = 0
        self.active, self.paused, self._generation_done, self.held = None, False, False, False
        self._space.set()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def next_frame(self) -> Frame:
        """The next 20 ms of output (silence when idle, paused or starved)."""
        reply = self.active
        if reply is None or self.paused or self.held:
            return Frame(self._silence, None, self.played, False)
        if self._buffered < self.frame_samples and not self._generation_done:
            if self.played:
                self.underruns += 1
            return Frame(self._silence, None, self.played, False)
        out = np.zeros(self.frame_samples, np.float32)
        filled = 0
        while filled < self.frame_samples and self._chunks:
            chunk = self._chunks[0]
            take = min(len(chunk), self.frame_samples - filled)
            out[filled:filled + take] = chunk[:take]
            filled += take
            if take == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[take:]
        self._buffered -= filled
        self.played += filled
        if self._buffered < self.capacity:
            self._space.set()
        finished = self._generation_done and self._buffered == 0
        if finished:
            self.active = None
        return Frame(out, reply if filled else None, self.played, finished)
