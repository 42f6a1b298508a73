"""The conversation record: what the user said and what the agent said *that the user heard*.

An agent turn keeps the full generated text, the spoken words with their spans in the reply audio
(from the TTS), and how much of that audio was played. When a reply is interrupted, the heard text
is cut at the playback position, to the word: a word counts as heard when at least half of it was
played. The LLM's context is built from this record (:meth:`Conversation.messages`), so words the
person never heard never enter it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from duplex.events import INPUT_RATE, Word
from duplex.stages import Dialogue, Message
from duplex.tools import ToolCall


@dataclass
class UserTurn:
    index: int
    text: str
    start: int  # stream samples where the user's speech began
    end: int  # ... and where it stopped
    ended_wall: float  # when the policy ended the turn
    open: bool = False  # the reply to it was cancelled before being heard: the turn goes on

    role = "user"


@dataclass
class ToolUse:
    """A tool call the reply made, where in the reply it came, and what it gave."""

    call: ToolCall
    text_before: str  # the reply's text before the call (its words are the ones spoken before it)
    started_wall: float
    output: str | None = None  # what the model was told; None while it runs
    error: str | None = None
    seconds: float = 0.0
    spoken: bool = False  # the reply went on from its result (False: interrupted before)

    def to_json(self) -> dict[str, Any]:
        return {"call_id": self.call.call_id, "name": self.call.name, "arguments": self.call.arguments,
                "output": self.output, "error": self.error, "seconds": round(self.seconds, 3), "spoken": self.spoken}


@dataclass
class AgentTurn:
    reply_id: int
    turn: int  # the user turn it answers
    sample_rate: int
    text: str = ""  # everything the LLM generated
    words: list[Word] = field(default_factory=list)  # spoken words, spans in reply samples
    played: int = 0  # reply samples played out
    heard: str = ""
    interrupted: bool = False
    done: bool = False
    started_wall: float = 0.0
    first_audio_wall: float | None = None
    tools: list[ToolUse] = field(default_factory=list)

    role = "assistant"

    def heard_words(self) -> list[Word]:
        return [w for w in self.words if (w.start + w.end) / 2 <= self.played]


def _add(out: list[Message], role: Literal["user", "assistant"], text: str) -> None:
    """Append a message, merging it into the last one of the same role (chat templates alternate)."""
    if not text:
        return
    if out and out[-1].role == role and out[-1].tool_call is None:
        out[-1] = Message(role, f"{out[-1].content} {text}")
    else:
        out.append(Message(role, text))


def _add_reply(out: list[Message], turn: AgentTurn) -> None:
    """A reply as the LLM sees it: the words heard, with each tool call it made (and the tool's
    output) where it came among them. A call made after the last word heard counts only if the
    reply went on from its result (else the user never heard it made)."""
    heard = turn.heard.split()
    at = 0
    for use in turn.tools:
        if use.output is None:
            continue  # never finished: the model never saw a result
        said = len(use.text_before.split())
        if said > len(heard) and not use.spoken:
            break
        before = min(said, len(heard))
        out.append(Message("assistant", " ".join(heard[at:before]), tool_call=use.call))
        out.append(Message("tool", use.output))
        at = before
    _add(out, "assistant", " ".join(heard[at:]))


class Conversation:
    def __init__(self, system_prompt: str = "") -> None:
        self.system_prompt = system_prompt
        self.turns: list[UserTurn | AgentTurn] = []
        self._replies: dict[int, AgentTurn] = {}
        self._version = 0  # bumped by every change to what messages() returns
        self._cached: tuple[int, tuple[Message, ...], tuple[Message, ...]] | None = None

    # -- user side ---------------------------------------------------------------------------------

    def user_turn_ended(self, text: str, start: int, end: int, wall: float) -> UserTurn:
        self._version += 1
        last = self.turns[-1] if self.turns else None
        if isinstance(last, UserTurn) and last.open:
            last.text, last.end, last.ended_wall, last.open = text, end, wall, False
            return last
        index = sum(isinstance(t, UserTurn) for t in self.turns)
        turn = UserTurn(index=index, text=text, start=start, end=end, ended_wall=wall)
        self.turns.append(turn)
        return turn

    # -- agent side --------------------------------------------------------------------------------

    def reply_started(self, reply_id: int, turn: int, sample_rate: int, wall: float) -> AgentTurn:
        return self.add_reply(AgentTurn(reply_id=reply_id, turn=turn, sample_rate=sample_rate, started_wall=wall))

    def add_reply(self, reply: AgentTurn) -> AgentTurn:
        """Add a reply made before it was committed (speculatively) as the agent's next turn."""
        self._version += 1
        self.turns.append(reply)
        self._replies[reply.reply_id] = reply
        return reply

    def reply(self, reply_id: int) -> AgentTurn:
        return self._replies[reply_id]

    def reply_closed(self, reply_id: int, interrupted: bool) -> AgentTurn:
        """The reply is over (played out, or interrupted at its current playback position)."""
        self._version += 1
        reply = self._replies[reply_id]
        reply.interrupted, reply.done = interrupted, True
        reply.heard = " ".join(w.text for w in reply.heard_words())
        return reply

    def reply_cancelled_unheard(self, reply_id: int) -> None:
        """The reply was dropped before any of it was heard: forget it; the user's turn reopens."""
        self._version += 1
        reply = self._replies.pop(reply_id)
        self.turns.remove(reply)
        last = self.turns[-1] if self.turns else None
        if isinstance(last, UserTurn):
            last.open = True

    # -- views -------------------------------------------------------------------------------------

    def messages(self, pending_user_text: str = "") -> Dialogue:
        """The dialogue for the LLM: user words, and agent words that were heard.

        ``pending_user_text`` is the user's turn in progress (it replaces an open user turn).
        Consecutive messages of one role are merged (chat templates expect alternation). The finished
        turns are merged once per change of the record: every call until the next change shares one
        ``settled`` tuple, so a partial costs the same however long the dialogue is.
        """
        if self._cached is None or self._cached[0] != self._version:
            done: list[Message] = []
            for turn in self.turns:
                if isinstance(turn, UserTurn):
                    if not turn.open:
                        _add(done, "user", turn.text)
                elif turn.done:
                    _add_reply(done, turn)
            self._cached = (self._version, tuple(done[:-1]), tuple(done[-1:]))
        _, settled, last = self._cached
        if not pending_user_text:
            return Dialogue(settled, last)
        if last and last[0].role == "user":
            return Dialogue(settled, (Message("user", f"{last[0].content} {pending_user_text}"),))
        return Dialogue(settled, (*last, Message("user", pending_user_text)))

    def to_json(self) -> dict[str, Any]:
        turns: list[dict[str, Any]] = []
        for t in self.turns:
            if isinstance(t, UserTurn):
                turns.append({"role": "user", "index": t.index, "text": t.text,
                              "start_s": round(t.start / INPUT_RATE, 3), "end_s": round(t.end / INPUT_RATE, 3)})
            else:
                turns.append({"role": "assistant", "reply_id": t.reply_id, "answers_turn": t.turn,
                              "heard": t.heard, "text": t.text, "interrupted": t.interrupted,
                              "played_s": round(t.played / t.sample_rate, 3),
                              "words": [asdict(w) for w in t.words], "sample_rate": t.sample_rate,
                              **({"tools": [u.to_json() for u in t.tools]} if t.tools else {})})
        return {"system_prompt": self.system_prompt, "turns": turns}
