"""A session's recording: both sides on one clock, and a transcript of what each side heard.

``Session(record=folder)`` (``Agent.session(record=...)``, ``duplex serve --record DIR``,
``duplex mic --record DIR``) writes, when the session closes:

- ``audio.wav``: stereo 16-bit PCM at the agent's output rate. Left: the user as the session received
  it (after its conversion to 16 kHz mono, resampled to the output rate). Right: the agent as played,
  i.e. the frames the transport took from :meth:`Session.audio`, minus those a live output gave back
  unheard at a barge-in (they are silence here, and appear again where they did play).
- ``transcript.json``: both sides in time order with word times in seconds of that WAV; the agent's
  words are the ones the user heard (a word counts when half of it was played, as in the record).
- ``events.jsonl``: every event but ``AudioIn``, with ``t`` (seconds since the session opened).
- ``conversation.json``: the conversation record (:meth:`Conversation.to_json`).

The clock is the input stream's: user sample ``n`` sits at ``n / 16000`` s, which is also where every
event's ``stream_samples`` points. An agent frame sits where the input stream was when the frame left
the session (the input received so far, plus the time since its last block arrived, at most
:data:`MAX_EXTRAPOLATION_S`), so the two channels line up as the user lived them; what a transport's
own buffer adds on the way to the ear (``Session.output_latency_s``) is not in it.

Memory stays bounded: audio older than :data:`TAIL_S` (what a barge-in can still take back) and the
event lines are written out about once a second, in a worker thread.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from duplex import events as ev
from duplex.audio import StreamResampler
from duplex.events import INPUT_RATE

if TYPE_CHECKING:
    from duplex.conversation import Conversation
    from duplex.playout import Frame

log = logging.getLogger(__name__)

TAIL_S = 2.0  # audio kept in memory: a live output gives back at most its queue (<= 1 s of frames)
FLUSH_S = 1.0  # how often what is older is written out
MAX_EXTRAPOLATION_S = 0.1  # an agent frame is placed at most this far past the last input received


@dataclass
class _Placed:
    """One agent frame of a reply in the recording: reply samples ``before..after`` at ``at``."""

    at: int  # recording sample where the frame starts
    before: int  # reply samples played before it
    after: int  # ... and after it


@dataclass
class _Channel:
    """One channel's samples not written yet, kept as the blocks they came in (joined once, when
    taken: not once per 20 ms frame); ``base`` is the recording sample of the first."""

    base: int = 0
    blocks: list[np.ndarray] = field(default_factory=list)  # our own copies
    size: int = 0

    @property
    def end(self) -> int:
        return self.base + self.size

    def put(self, at: int, pcm: np.ndarray) -> int:
        """Write ``pcm`` at ``at`` (never before the end: the channel only grows); returns where."""
        at = max(at, self.end)
        gap = at - self.end
        if gap:
            self.blocks.append(np.zeros(gap, np.float32))
        self.blocks.append(np.array(pcm, np.float32))
        self.size += gap + len(pcm)
        return at

    def silence(self, start: int, end: int) -> None:
        """Recording samples ``start..end`` (those still here) become silence."""
        whole = self._joined()
        whole[max(start - self.base, 0):max(end - self.base, 0)] = 0.0

    def take(self, upto: int) -> np.ndarray:
        """The samples before recording sample ``upto`` (zero-padded to it), gone from memory."""
        n = max(0, upto - self.base)
        whole = self._joined()
        out, rest = whole[:n], whole[n:]
        if len(out) < n:
            out = np.concatenate([out, np.zeros(n - len(out), np.float32)])
        self.blocks, self.size, self.base = [rest] if len(rest) else [], len(rest), self.base + n
        return out

    def _joined(self) -> np.ndarray:
        if len(self.blocks) != 1:
            self.blocks = [np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.float32)]
        return self.blocks[0]


class Recording:
    """Collects a session's two sides and events; :meth:`close` writes the files (see the module)."""

    def __init__(self, folder: str | os.PathLike[str], rate: int, *, earlier: Sequence[object] = ()) -> None:
        self.folder = Path(folder)
        self._earlier = {id(t) for t in earlier}  # turns of a resumed conversation: not in this recording
        self.rate = rate
        self._resample = StreamResampler(INPUT_RATE, rate)
        self._user = _Channel()
        self._agent = _Channel()
        self._frames: list[tuple[int, int]] = []  # (start, end) of the recent agent frames, oldest first
        self._replies: dict[int, list[_Placed]] = {}  # reply id -> its frames in the recording
        self._finals: list[ev.Word] = []  # the user's words, in input stream samples
        self._lines: list[str] = []  # event lines not written yet
        self._wav: wave.Wave_write | None = None
        self._events_file: BinaryIO | None = None
        self._written = 0  # recording samples written to audio.wav
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one write at a time, in order
        self.closed = False

    # -- fed by the session (event loop; cheap) ----------------------------------------------------

    def user(self, block: np.ndarray) -> None:
        """The next block of user audio (16 kHz mono float32, contiguous with the last)."""
        self._user.put(self._user.end, self._resample(block))
        self._start_writer()

    def agent(self, frame: Frame, stream_pos: float) -> None:
        """A frame that left the session while the input stream stood at ``stream_pos`` samples."""
        at = self._agent.put(round(stream_pos * self.rate / INPUT_RATE), frame.pcm)
        self._frames.append((at, at + len(frame.pcm)))
        if len(self._frames) > 4 * int(TAIL_S * 50):
            del self._frames[: len(self._frames) // 2]
        if frame.reply_id is not None:
            placed = self._replies.setdefault(frame.reply_id, [])
            before = placed[-1].after if placed else 0
            if frame.played > before:
                last = placed[-1] if placed else None
                if last is not None and last.at + last.after - last.before == at:
                    last.after = frame.played  # the run of frames goes on: one entry per run, not per frame
                else:
                    placed.append(_Placed(at=at, before=before, after=frame.played))
        self._start_writer()

    def unplay(self, frames: int) -> None:
        """The last ``frames`` agent frames were not heard (a live output gave them back): silence."""
        for _ in range(min(frames, len(self._frames))):
            start, end = self._frames.pop()
            self._agent.silence(start, end)
            for placed in self._replies.values():
                while placed and placed[-1].at >= start:
                    placed.pop()
                if placed and placed[-1].at + placed[-1].after - placed[-1].before > start:
                    last = placed[-1]  # a run of frames that reached into this one: it ends before it
                    last.after = last.before + start - last.at

    def event(self, event: ev.Event, t0: float) -> None:
        if isinstance(event, ev.AudioIn):
            return
        if isinstance(event, ev.TranscriptFinal):
            self._finals.extend(event.words)
        row = ev.to_json(event)
        row["t"] = round(event.wall - t0, 4)
        self._lines.append(json.dumps(row) + "\n")

    # -- writing -------------------------------------------------------------------------------------

    def _start_writer(self) -> None:
        if self._writer is None and not self.closed:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="recording")

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            keep = int(TAIL_S * self.rate)
            await self._flush(min(self._user.end, self._agent.end) - keep)

    async def _flush(self, upto: int) -> None:
        async with self._lock:
            upto = max(upto, self._written)
            left, right = self._user.take(upto), self._agent.take(upto)
            lines, self._lines = self._lines, []
            await asyncio.to_thread(self._write, left, right, lines)
            self._written = upto

    def _write(self, left: np.ndarray, right: np.ndarray, lines: list[str]) -> None:
        if self._wav is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._wav = wave.open(str(self.folder / "audio.wav"), "wb")
            self._wav.setnchannels(2)
            self._wav.setsampwidth(2)
            self._wav.setframerate(self.rate)
            self._events_file = open(self.folder / "events.jsonl", "wb")
        stereo = np.stack([left, right], axis=1)
        self._wav.writeframes((np.clip(stereo, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes())
        assert self._events_file is not None
        self._events_file.write("".join(lines).encode())
        self._events_file.flush()

    async def close(self, conversation: Conversation) -> None:
        """Write everything left and the transcript; the files are complete when this returns."""
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._user.put(self._user.end, self._resample(np.zeros(0, np.float32), last=True))
        await self._flush(max(self._user.end, self._agent.end))
        transcript = self.transcript(conversation)
        record = conversation.to_json()

        def finish() -> None:
            assert self._wav is not None and self._events_file is not None
            self._wav.close()
            self._events_file.close()
            (self.folder / "transcript.json").write_text(json.dumps(transcript, indent=2))
            (self.folder / "conversation.json").write_text(json.dumps(record, indent=2))

        await asyncio.to_thread(finish)

    # -- the transcript --------------------------------------------------------------------------------

    def _reply_time(self, reply_id: int, sample: int) -> float | None:
        """Seconds in the recording where reply sample ``sample`` played (None: it never did)."""
        placed = self._replies.get(reply_id, [])
        i = bisect.bisect_right([p.before for p in placed], sample) - 1
        if i < 0 or sample >= placed[i].after:
            return None
        return (placed[i].at + sample - placed[i].before) / self.rate

    def transcript(self, conversation: Conversation) -> dict[str, Any]:
        """Both sides in time order, word times in seconds of ``audio.wav``."""
        from duplex.conversation import AgentTurn, UserTurn

        turns: list[dict[str, Any]] = []
        finals = sorted(self._finals, key=lambda w: w.start)
        starts = [w.start for w in finals]
        ours = [t for t in conversation.turns if id(t) not in self._earlier]
        user_turns = [t for t in ours if isinstance(t, UserTurn)]
        for k, t in enumerate(user_turns):  # a turn's words: from its start up to the next turn's
            lo = t.start if k else 0
            hi = user_turns[k + 1].start if k + 1 < len(user_turns) else None
            words = finals[bisect.bisect_left(starts, lo):bisect.bisect_left(starts, hi) if hi is not None else None]
            turns.append({"role": "user", "text": t.text, "start_s": round(t.start / INPUT_RATE, 3),
                          "end_s": round(t.end / INPUT_RATE, 3),
                          "words": [{"text": w.text, "start_s": round(w.start / INPUT_RATE, 3),
                                     "end_s": round(w.end / INPUT_RATE, 3)} for w in words]})
        for turn in ours:
            if not isinstance(turn, AgentTurn) or not turn.heard_words():
                continue
            said: list[dict[str, Any]] = []
            for w in turn.heard_words():
                start = self._reply_time(turn.reply_id, w.start)
                end = self._reply_time(turn.reply_id, max(w.start, w.end - 1))
                if start is None:
                    continue
                said.append({"text": w.text, "start_s": round(start, 3),
                             "end_s": round(end if end is not None else start, 3)})
            if said:
                turns.append({"role": "assistant", "reply_id": turn.reply_id, "text": turn.heard,
                              "interrupted": turn.interrupted, "start_s": said[0]["start_s"],
                              "end_s": said[-1]["end_s"], "words": said})
        turns.sort(key=lambda t: t["start_s"])
        return {"audio": "audio.wav", "sample_rate": self.rate,
                "channels": ["user, as the session received it", "agent, as played"], "turns": turns}
