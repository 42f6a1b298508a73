"""The agent's output buffer: reply audio waiting for the speaker, cut into 20 ms frames.

One reply plays at a time. Audio of any other reply id is refused at the door, and :meth:`drop`
clears the buffer at once, so output of a cancelled reply can never reach the speaker. The buffer is
bounded (``capacity_s``): a TTS running ahead of playback waits in :meth:`Playout.put`. The session
pulls one frame per 20 ms tick with :meth:`Playout.next_frame`; the count of reply samples played is
the playback position the conversation record cuts interrupted replies at.

No cut clicks: a pause (and a drop of a reply being heard) fades the next ``FADE_MS`` out instead of
stopping mid-wave, and a resume fades back in from the exact sample the pause stopped at (the faded
samples were not counted as played, so they play again). Frames handed out but not heard yet (waiting
in a live output's queue at a barge-in) are given back with :meth:`Playout.rewind`: they play again
on resume and never count as heard.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import numpy as np

FADE_MS = 10
HISTORY_FRAMES = 50  # frames handed out that rewind() can give back (1 s)


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
        fade = self.sample_rate * FADE_MS // 1000
        self._fade_out = np.linspace(1.0, 0.0, fade, endpoint=False, dtype=np.float32)
        self._fade_in = 1.0 - self._fade_out  # from 0 up
        self._edge: str | None = None  # "out": the next frame fades the audio out, "in": fades it in
        self._tail: np.ndarray | None = None  # a dropped reply's fade-out, still to be heard
        # per frame handed out: its reply, the reply samples it took, the played count before it
        self._history: deque[tuple[int | None, np.ndarray | None, int]] = deque(maxlen=HISTORY_FRAMES)
        self._last_taken: np.ndarray | None = None

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
        """Forget the playing reply and everything queued for it (barge-in); if it was being heard,
        its next ``FADE_MS`` still play, fading out."""
        if self.active is not None and not self.paused and not self.held and self.played and self._chunks:
            self._tail = self._faded(self._peek(len(self._fade_out)), self._fade_out)
        self._history.clear()
        self._chunks.clear()
        self._buffered = 0
        self.active, self.paused, self._generation_done, self.held = None, False, False, False
        self._space.set()

    def pause(self) -> None:
        if not self.paused:
            self.paused, self._edge = True, "out"

    def resume(self) -> None:
        if self.paused:
            self.paused, self._edge = False, "in"

    def rewind(self, frames: int) -> int:
        """Give back the last ``frames`` frames handed out (not heard: a live output dropped them):
        their reply audio goes back in front of the buffer and off the played count. Returns the
        reply samples given back."""
        back = 0
        for _ in range(min(frames, len(self._history))):
            reply_id, pcm, played = self._history.pop()
            if reply_id is None or pcm is None or reply_id != self.active:
                continue
            self._chunks.appendleft(pcm)
            self._buffered += len(pcm)
            self.played, back = played, back + len(pcm)
        if back and not self.paused:
            self._edge = "in"
        return back

    def _peek(self, n: int) -> np.ndarray:
        """The next ``n`` buffered samples (fewer if not there), not consumed."""
        out, need = [], n
        for chunk in self._chunks:
            out.append(chunk[:need])
            need -= len(out[-1])
            if need <= 0:
                break
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _faded(self, pcm: np.ndarray, ramp: np.ndarray) -> np.ndarray:
        frame = np.zeros(self.frame_samples, np.float32)
        n = min(len(pcm), len(ramp))
        frame[:n] = pcm[:n] * ramp[:n]
        return frame

    def next_frame(self) -> Frame:
        """The next 20 ms of output (silence when idle, paused or starved)."""
        self._last_taken = None
        frame = self._next_frame()
        taken = self._last_taken
        self._history.append((frame.reply_id, taken, frame.played - (len(taken) if taken is not None else 0)))
        return frame

    def _next_frame(self) -> Frame:
        reply = self.active
        if self._tail is not None:
            tail, self._tail = self._tail, None
            return Frame(tail, None, self.played, False)
        if reply is None or self.paused or self.held:
            if reply is not None and self.paused and self._edge == "out":
                self._edge = None
                return Frame(self._faded(self._peek(len(self._fade_out)), self._fade_out), None, self.played, False)
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
        self._last_taken = out[:filled].copy()
        if self._edge == "in":
            n = min(filled, len(self._fade_in))
            out[:n] *= self._fade_in[:n]
        self._edge = None
        self._buffered -= filled
        self.played += filled
        if self._buffered < self.capacity:
            self._space.set()
        finished = self._generation_done and self._buffered == 0
        if finished:
            self.active = None
        return Frame(out, reply if filled else None, self.played, finished)
