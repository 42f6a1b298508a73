"""One reply of the agent as one handle: its id, its record, its task, its audio, its timing, its events.

A :class:`Reply` is made when the session starts generating (speculatively, as soon as the user's
speech stops, or at the end of the turn). While it is *speculative* nothing of it reaches the
user or the record: its audio waits in the playout, held; the events it makes (text, audio) wait
in :attr:`Reply.held`; its record is detached. Committing it (the turn ended with the words it
answers) adds the record to the conversation, releases the held events and the audio.

:meth:`Reply.stop` is the one way to stop a reply, whatever it is doing: it cancels the reply's task,
which closes the LLM token stream and the TTS stream it reads (each engine frees the reply's row
when its stream closes; a step already running lands and is dropped), and its audio leaves the
playout at once, so nothing more of it is heard. What the record keeps of a stopped reply (the
words heard, or nothing) is the session's to decide.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from duplex.conversation import AgentTurn
from duplex.events import Event
from duplex.playout import Playout


@dataclass
class TurnTiming:
    """Wall times of one turn, for the latency breakdown."""

    speech_end_wall: float
    final_wall: float
    turn_end_wall: float
    first_token_wall: float | None = None
    first_chunk_wall: float | None = None

    def breakdown(self, first_audio_wall: float) -> dict[str, float]:
        """Where the time from the end of the user's speech to the first audio went. Work done
        before the turn ended (speculation) counts only from the end of the turn on."""
        turn_end = self.turn_end_wall
        token = max(self.first_token_wall or first_audio_wall, turn_end)
        chunk = max(self.first_chunk_wall or first_audio_wall, token)
        parts = {
            "voice_to_voice_s": first_audio_wall - self.speech_end_wall,
            "asr_final_s": max(0.0, self.final_wall - self.speech_end_wall),
            "end_of_turn_s": turn_end - self.speech_end_wall,
            "llm_first_token_s": token - turn_end,
            "tts_first_audio_s": chunk - token,
            "playout_s": max(0.0, first_audio_wall - chunk),
        }
        if self.first_chunk_wall is not None and self.first_chunk_wall < turn_end:
            parts["speculative_lead_s"] = turn_end - self.first_chunk_wall  # audio was ready this early
        return parts


@dataclass(eq=False)
class Reply:
    reply_id: int
    answers: str  # the user's words it answers
    record: AgentTurn
    timing: TurnTiming
    speculative: bool
    playout: Playout  # where its audio goes; it takes this reply's audio from when the reply is made
    task: asyncio.Task[None] | None = None
    held: list[Event] = field(default_factory=list)  # events made while speculative
    cancelled: bool = False  # no more text, audio or events of it (the TTS may still hold some)
    committed: asyncio.Event = field(default_factory=asyncio.Event)  # set once it is a real reply

    def __post_init__(self) -> None:
        if not self.speculative:
            self.committed.set()
        self.playout.start_reply(self.reply_id, held=self.speculative)

    def stop(self) -> None:
        """Stop it: no more generation (its LLM and TTS rows are freed as its task unwinds) and none
        of its audio plays from the next frame on (a reply being heard fades out). Idempotent."""
        self.cancelled = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.playout.active == self.reply_id:
            self.playout.drop()

    def commit(self) -> list[Event]:
        """It is a real reply now: its audio plays; returns the events held back, in the order they
        were made."""
        self.speculative = False
        self.committed.set()
        self.playout.release(self.reply_id)
        held, self.held = self.held, []
        return held
