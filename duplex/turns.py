"""Turn-taking and barge-in policy: a pure state machine on stream time.

The policy sees what the listening side produces (VAD boundaries, ASR partials and finals, the LLM's
end-of-turn estimate) and what the speaking side reports (reply audible, reply played out), and
answers with actions for the session to carry out. It holds no tasks and no clock of its own: time is
the input stream position (samples at 16 kHz), passed to :meth:`TurnPolicy.advance`, so decisions are
deterministic and replayable.

Phases::

    LISTENING --turn ends--> THINKING --first audio heard--> SPEAKING --played out--> LISTENING
                                |                               |
                  user speaks again: CancelReply        user speaks: Pause --> PAUSED
                  (nothing was heard; the turn goes on)                          |
                              words (not a backchannel): Interrupt --> LISTENING |
                              backchannel, or no words after the speech: Resume -> SPEAKING
                              paused for max_pause_s: Interrupt (words) or Resume (none)

A backchannel check is about the exact words it was asked about: a verdict about words that have
grown since is stale and the check is asked again; a check that fails counts as an interruption.
Words that come after a backchannel verdict in the same utterance ("yeah" ... "yeah but wait stop
that", in one breath or after a comma pause) are new speech over the agent: it pauses again at
once and the whole utterance is checked; only the words judged are dropped.

End of turn: the user's speech stopped, the ASR has closed the utterance (its final arrived), there
are words, and the silence since the speech ended lasts :meth:`TurnPolicy.commit_wait`: from
``confident_silence_s`` (the ASR's end-of-utterance token, or an LLM estimate at ``confident_eot``)
through ``min_silence_s`` (an estimate at ``eot_threshold``) to ``max_silence_s`` (no sign the message
is complete).

Speculation: once the user's voice has been quiet ``speculate_after_s`` inside speech (the VAD's first
silent window, not ``min_silence_ms`` later when the speech is sure to have stopped), and whenever the words change
while the silence lasts,
:class:`Speculate` asks for a reply to be made at once with its audio held back; :class:`EndTurn`
commits it if it answers the same text; voice before that withdraws it (:class:`Withdraw`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from duplex.config import TurnConfig
from duplex.events import INPUT_RATE


class Phase(enum.Enum):
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"
    PAUSED = "paused"


@dataclass(frozen=True)
class EndTurn:
    text: str
    speech_end: int  # stream sample where the user's speech stopped


@dataclass(frozen=True)
class CancelReply:
    """The user went on speaking before any reply audio was heard: drop the reply, keep listening."""


@dataclass(frozen=True)
class Pause:
    """User speech over the agent: silence playback now, pending confirmation."""

    speech_start: int


@dataclass(frozen=True)
class CheckBargeIn:
    """Words over the agent: ask whether ``text`` is a backchannel, then call
    :meth:`TurnPolicy.barge_in_verdict` with the answer *and this text*."""

    text: str


@dataclass(frozen=True)
class Resume:
    """A false alarm (no words) or a backchannel: playback goes on where it paused."""


@dataclass(frozen=True)
class Interrupt:
    """A real interruption: drop queued audio, cancel the reply, keep what was heard."""

    text: str


@dataclass(frozen=True)
class Speculate:
    """The user's speech stopped: start a reply to ``text`` now, its audio held back until the turn
    ends with the same text (:class:`EndTurn` commits it), replacing any earlier speculation."""

    text: str


@dataclass(frozen=True)
class Withdraw:
    """The user went on speaking: the speculative reply must vanish without a trace."""


Action = EndTurn | CancelReply | Pause | CheckBargeIn | Resume | Interrupt | Speculate | Withdraw


def _words(text: str) -> tuple[str, ...]:
    """The words of ``text`` as a backchannel is compared: lower case, no punctuation."""
    return tuple(re.findall(r"[\w'-]+", text.lower()))


class TurnPolicy:
    def __init__(self, config: TurnConfig | None = None, rate: int = INPUT_RATE) -> None:
        self.cfg = config or TurnConfig()
        self.rate = rate
        self.phase = Phase.LISTENING
        self.now = 0  # stream samples seen
        self.user_speaking = False
        self.speech_start = 0
        self.speech_end: int | None = None  # end of the user's last speech in this turn
        self.awaiting_final = False  # speech stopped; the ASR's final for it has not arrived yet
        self.finals: list[str] = []  # closed utterances of the current user turn
        self.partial = ""  # the open utterance's hypothesis
        self.eou = False  # the last final carried the model's end-of-utterance mark
        self.eot: float | None = None  # the LLM's estimate for the current text
        self.in_utterance = False  # the VAD heard speech the ASR has not closed yet
        self.check_pending = False
        self.pause_start: int | None = None  # stream sample where the current pause began
        self.pause_unconfirmed = False  # the pause came from one voiced VAD window; no SpeechStarted yet
        self.resume_at: int | None = None  # ... and its voice has ended: resume here unless it comes back
        self.quiet_since: int | None = None  # the user's voice paused here, inside speech not ended yet
        self.discard_utterance = False  # the open utterance was a backchannel: not part of any turn ...
        self.backchannel_words: tuple[str, ...] = ()  # ... as far as the words judged so (others are new speech)
        self.speculated: str | None = None  # the text an outstanding speculative reply answers
        self._ended_text: list[str] = []  # the last ended turn, restored if its reply is cancelled

    # -- what the user's side says ---------------------------------------------------------------

    @property
    def user_text(self) -> str:
        return " ".join(t for t in (*self.finals, self.partial) if t)

    def voice_edge(self, at: int, voiced: bool) -> list[Action]:
        """The VAD's window-by-window decision changed (before it is speech or silence for sure).
        A voiced window while the agent speaks pauses it at once: barge-in acts on the first window,
        not ``min_speech_ms`` later. If that voice dies before it is speech (a click, a cough), the
        agent resumes where it paused (``onset_hold_s`` of quiet later: a dip inside the first syllable
        is not the end); if it becomes speech, the pause goes on as any other."""
        self.now = max(self.now, at)
        if self.user_speaking:  # a pause inside speech the VAD has not ended (yet): see advance()
            self.quiet_since = None if voiced else at
            if voiced and self.speculated is not None and self.phase is Phase.LISTENING:
                self.speculated = None  # the voice came back: the guess goes
                return [Withdraw()]
            return self.advance(self.now)
        if voiced and self.phase is Phase.SPEAKING and not self.user_speaking:
            pause = self._pause(at)
            self.pause_unconfirmed = True
            return [pause]
        if self.phase is Phase.PAUSED and self.pause_unconfirmed and not self.user_speaking:
            self.resume_at = None if voiced else at + int(self.cfg.onset_hold_s * self.rate)
            return self.advance(self.now)
        return []

    def speech_started(self, start: int) -> list[Action]:
        self.user_speaking, self.speech_start, self.in_utterance = True, start, True
        self.pause_unconfirmed = False
        self.now = max(self.now, start)
        if self.speculated is not None:  # only in LISTENING: the turn goes on
            self.speculated = None
            return [Withdraw()]
        if self.phase is Phase.THINKING:
            self.phase = Phase.LISTENING
            self.finals, self._ended_text = self._ended_text + self.finals, []
            return [CancelReply()]
        if self.phase is Phase.SPEAKING:
            return [self._pause(start)]
        return []

    def _pause(self, start: int) -> Pause:
        self.phase, self.pause_start, self.pause_unconfirmed, self.resume_at = Phase.PAUSED, start, False, None
        return Pause(start)

    def speech_stopped(self, end: int) -> list[Action]:
        self.user_speaking, self.speech_end, self.awaiting_final, self.quiet_since = False, end, True, None
        self.now = max(self.now, end)
        return self.advance(self.now)

    def transcript(self, text: str) -> list[Action]:
        """A partial hypothesis of the open utterance. Words with no speech heard by the VAD (an ASR
        hallucinating on silence or noise) are ignored: they neither interrupt nor make a turn. In an
        utterance judged a backchannel only words beyond those judged count: "yeah" was one, "yeah
        but wait" is new speech over the agent (it pauses again and is checked, whole)."""
        if not self.in_utterance or (self.discard_utterance and not self._beyond_backchannel(text)):
            return []
        self.discard_utterance = False
        if text != self.partial:
            self.partial, self.eot = text, None
        return self._words_arrived()

    def final(self, text: str, eou: bool = False) -> list[Action]:
        """The ASR closed an utterance (``text`` may be empty: nothing was recognised)."""
        self.partial = ""
        if not self.in_utterance or (self.discard_utterance and not self._beyond_backchannel(text)):
            text = ""
        self.discard_utterance = False
        if not self.user_speaking:
            self.in_utterance = False
        if text:
            self.finals.append(text)
            self.eou, self.eot = eou, None
        if not self.user_speaking:
            self.awaiting_final = False
        return self._words_arrived() + self.advance(self.now)

    def eot_estimate(self, probability: float, text: str) -> list[Action]:
        """The LLM's estimate that ``text`` is a complete message (ignored if the text moved on)."""
        if text == self.user_text:
            self.eot = probability
        return self.advance(self.now)

    def _beyond_backchannel(self, text: str) -> bool:
        """Whether ``text`` (of an utterance judged a backchannel) goes beyond the exact words judged:
        anything but those words or the start of them ("yeah" judged: "yeah", "Yeah." and "" are not
        beyond it; "yeah but" is, and so is "yeah wait" after "yeah yeah" was judged)."""
        words = _words(text)
        return words != self.backchannel_words[:len(words)]

    def _words_arrived(self) -> list[Action]:
        text = self.user_text
        if not text:
            return []
        if self.phase is Phase.SPEAKING:  # words before the VAD noticed: same as speech onset
            return [self._pause(self.speech_start), *self._words_arrived()]
        if self.phase is Phase.PAUSED and not self.check_pending:
            self.check_pending = True
            return [CheckBargeIn(text)]
        return []

    def barge_in_verdict(self, backchannel: bool | None, text: str) -> list[Action]:
        """The answer to the :class:`CheckBargeIn` that asked about ``text``: True (a backchannel),
        False (an interruption) or None (the check failed: yield, the safe choice). A verdict about
        words that have grown or changed since is stale: it is dropped and the check asked again
        about the words now; one that comes after the pause ended is dropped."""
        if self.phase is not Phase.PAUSED or not self.check_pending:
            return []
        self.check_pending = False
        if text != self.user_text and self.user_text and backchannel is not None:
            self.check_pending = True
            return [CheckBargeIn(self.user_text)]
        if backchannel:
            self.phase, self.pause_start = Phase.SPEAKING, None
            self.backchannel_words = _words(self.partial)  # the open utterance's words judged
            self.finals, self.partial, self.discard_utterance = [], "", True
            return [Resume()]
        return [self._interrupt()]

    def _interrupt(self) -> Interrupt:
        self.phase, self.pause_start, self.check_pending = Phase.LISTENING, None, False
        return Interrupt(self.user_text)

    # -- time --------------------------------------------------------------------------------------

    def advance(self, now: int) -> list[Action]:
        self.now = max(self.now, now)
        if self.phase is Phase.PAUSED and self.pause_unconfirmed and self.resume_at is not None \
                and self.now >= self.resume_at and not self.user_speaking and not self.check_pending:
            self.phase, self.pause_start, self.pause_unconfirmed, self.resume_at = Phase.SPEAKING, None, False, None
            return [Resume()]
        if self.phase is Phase.PAUSED and self.pause_start is not None \
                and (self.now - self.pause_start) / self.rate >= self.cfg.max_pause_s:
            # no pause outlives its bound, whatever a check is doing: words mean yield, none resume
            if self.user_text:
                return [self._interrupt()]
            self.phase, self.pause_start, self.check_pending = Phase.SPEAKING, None, False
            return [Resume()]
        if self.user_speaking and self.quiet_since is not None and self.phase is Phase.LISTENING \
                and self.user_text and self.cfg.speculate and self.speculated != self.user_text \
                and (self.now - self.quiet_since) / self.rate >= self.cfg.speculate_after_s:
            self.speculated = self.user_text  # the voice paused inside speech: guess now, not at its end
            return [Speculate(self.user_text)]
        if self.user_speaking or self.speech_end is None:
            return []
        silence = (self.now - self.speech_end) / self.rate
        if self.phase is Phase.LISTENING and self.user_text:
            if not self.awaiting_final and silence >= self.commit_wait():
                text, end = self.user_text, self.speech_end
                self._ended_text, self.finals, self.partial = [text], [], ""
                self.eou, self.eot, self.phase, self.speculated = False, None, Phase.THINKING, None
                return [EndTurn(text, end)]
            if self.cfg.speculate and self.speculated != self.user_text:  # words so far, final or not
                self.speculated = self.user_text
                return [Speculate(self.user_text)]
        if self.awaiting_final:
            return []
        if self.phase is Phase.PAUSED and not self.user_text and not self.check_pending \
                and not self.pause_unconfirmed:  # (that pause ends with its voice: voice_edge)
            if silence >= self.cfg.false_interruption_s:
                self.phase, self.pause_start = Phase.SPEAKING, None
                return [Resume()]
        return []

    def commit_wait(self) -> float:
        """Seconds of silence after the speech before the turn ends, shrinking with the evidence
        that the message is complete: ``confident_silence_s`` on the ASR's end-of-utterance token or
        an LLM estimate at ``confident_eot``, ``min_silence_s`` at ``eot_threshold``, else
        ``max_silence_s``."""
        cfg = self.cfg
        if self.eou or (self.eot is not None and self.eot >= cfg.confident_eot):
            return cfg.confident_silence_s
        if self.eot is not None and self.eot >= cfg.eot_threshold:
            return cfg.min_silence_s
        return cfg.max_silence_s

    # -- what the agent's side says ----------------------------------------------------------------

    def reply_audible(self) -> None:
        """The first audio of the reply reached the speaker."""
        if self.phase is Phase.THINKING:
            self.phase = Phase.SPEAKING
            self._ended_text = []

    def reply_finished(self) -> None:
        """The reply was played out completely (or produced nothing)."""
        if self.phase in (Phase.THINKING, Phase.SPEAKING):
            self.phase = Phase.LISTENING
            self._ended_text = []
