"""Typed session events and the time base they share.

Every event carries two times:

- ``stream_samples``: the input stream time it depends on, in samples of the 16 kHz input since the
  session started (the last input sample whose content the event reflects);
- ``wall``: the clock time (event-loop seconds, virtual in simulations) when it was made.

Latency figures are differences of these, never guesses. Events serialise to flat JSON objects with
a ``type`` field (see :func:`to_json`), which is what the timeline file and the browser data channel
carry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

INPUT_RATE = 16_000
"""Sample rate of the input stream time base (every model stage listens at 16 kHz)."""


@dataclass(frozen=True, slots=True)
class Word:
    """One word with its span. Input words: stream samples; agent words: samples of the reply audio."""

    text: str
    start: int
    end: int


@dataclass(frozen=True, kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    stream_samples: int
    wall: float

    @property
    def stream_s(self) -> float:
        return self.stream_samples / INPUT_RATE


# -- input side ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AudioIn(Event):
    """A block of user audio entered the pipeline (after conversion to 16 kHz mono)."""

    type: ClassVar[str] = "audio.in"
    samples: int


@dataclass(frozen=True, kw_only=True)
class SpeechStarted(Event):
    """VAD: speech began at ``start`` (stream samples)."""

    type: ClassVar[str] = "vad.speech_started"
    start: int


@dataclass(frozen=True, kw_only=True)
class SpeechStopped(Event):
    """VAD: speech ended at ``end`` (stream samples; the start of the trailing silence)."""

    type: ClassVar[str] = "vad.speech_stopped"
    start: int
    end: int


@dataclass(frozen=True, kw_only=True)
class VoiceEdge(Event):
    """VAD: its window-by-window decision changed at ``at`` (stream samples, a window's start):
    ``voiced``, a window at or above the threshold after silence, or not, one below it after speech.
    :class:`SpeechStarted` / :class:`SpeechStopped` follow when the change lasts (``min_speech_ms``,
    ``min_silence_ms``); this is the earliest sign, for what must act before that (pausing the
    agent's voice under the user's, at the first voiced window)."""

    type: ClassVar[str] = "vad.voice_edge"
    at: int
    voiced: bool


VADEvent = SpeechStarted | SpeechStopped | VoiceEdge


@dataclass(frozen=True, kw_only=True)
class TranscriptPartial(Event):
    """ASR hypothesis of the current utterance: ``stable`` never changes again, ``unstable`` may."""

    type: ClassVar[str] = "transcript.partial"
    stable: str
    unstable: str = ""
    words: tuple[Word, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(p for p in (self.stable, self.unstable) if p)


@dataclass(frozen=True, kw_only=True)
class TranscriptFinal(Event):
    """ASR: the utterance is complete. ``eou`` is True when the model itself detected its end (an
    end-of-utterance token), False when it was closed because the VAD heard silence."""

    type: ClassVar[str] = "transcript.final"
    text: str
    words: tuple[Word, ...] = ()
    eou: bool = False


@dataclass(frozen=True, kw_only=True)
class EndOfTurnEstimate(Event):
    """The LLM's probability that the user's message is complete, read after prefilling it."""

    type: ClassVar[str] = "turn.estimate"
    probability: float


@dataclass(frozen=True, kw_only=True)
class TurnEnded(Event):
    """The policy decided the user finished speaking; ``speech_end`` is where their speech stopped."""

    type: ClassVar[str] = "turn.ended"
    turn: int
    text: str
    speech_end: int


# -- agent side ---------------------------------------------------------------------------------

AgentStateName = Literal["listening", "thinking", "speaking"]


@dataclass(frozen=True, kw_only=True)
class AgentState(Event):
    type: ClassVar[str] = "agent.state"
    state: AgentStateName


@dataclass(frozen=True, kw_only=True)
class ReplyStarted(Event):
    type: ClassVar[str] = "reply.started"
    reply_id: int
    turn: int


@dataclass(frozen=True, kw_only=True)
class ReplyText(Event):
    """A piece of the reply text as the LLM produced it."""

    type: ClassVar[str] = "reply.text"
    reply_id: int
    delta: str


@dataclass(frozen=True, kw_only=True)
class ToolCalled(Event):
    """The reply called a tool (``arguments``: the JSON the model wrote); the tool runs now."""

    type: ClassVar[str] = "tool.called"
    reply_id: int
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, kw_only=True)
class ToolResult(Event):
    """A tool call ended: ``output`` is what the model is told (``{"error": ...}`` on a failure).
    ``spoken`` False: the reply was interrupted first and the result never reached speech."""

    type: ClassVar[str] = "tool.result"
    reply_id: int
    call_id: str
    name: str
    output: str
    error: str | None = None
    seconds: float = 0.0
    spoken: bool = True


@dataclass(frozen=True, kw_only=True)
class ReplyAudio(Event):
    """A chunk of synthesised reply audio was queued for playback (``words`` in reply samples)."""

    type: ClassVar[str] = "reply.audio"
    reply_id: int
    offset: int
    samples: int
    words: tuple[Word, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AudioOut(Event):
    """The first frame of a reply left the speaker (the moment voice-to-voice latency ends)."""

    type: ClassVar[str] = "audio.out"
    reply_id: int


@dataclass(frozen=True, kw_only=True)
class PlaybackProgress(Event):
    """How much of a reply has been played out, in reply samples at the output rate."""

    type: ClassVar[str] = "playback.progress"
    reply_id: int
    played: int


@dataclass(frozen=True, kw_only=True)
class BargeIn(Event):
    """User speech while the agent speaks: playback paused, pending confirmation."""

    type: ClassVar[str] = "barge_in.started"
    reply_id: int
    speech_start: int


@dataclass(frozen=True, kw_only=True)
class Resumed(Event):
    """The barge-in carried no words (cough, noise): playback resumes where it paused."""

    type: ClassVar[str] = "barge_in.resumed"
    reply_id: int


@dataclass(frozen=True, kw_only=True)
class Interrupted(Event):
    """The user interrupted: queued audio dropped, generation cancelled, ``heard`` kept."""

    type: ClassVar[str] = "reply.interrupted"
    reply_id: int
    heard: str
    played: int


@dataclass(frozen=True, kw_only=True)
class ReplyDone(Event):
    type: ClassVar[str] = "reply.done"
    reply_id: int
    text: str
    heard: str
    interrupted: bool


# -- diagnostics --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Metric(Event):
    """A measured figure, e.g. ``voice_to_voice_s`` for a turn."""

    type: ClassVar[str] = "metric"
    name: str
    value: float
    reply_id: int | None = None
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Error(Event):
    """A stage failed or input was refused; the session goes on where it can."""

    type: ClassVar[str] = "error"
    stage: str
    message: str
    fatal: bool = False


def to_json(event: Event) -> dict[str, Any]:
    """Flat JSON-ready dict of an event, with its ``type`` and ``stream_s`` added."""
    out: dict[str, Any] = {"type": event.type}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "words":
            value = [dataclasses.asdict(w) for w in value]
        out[f.name] = round(value, 4) if isinstance(value, float) else value
    out["stream_s"] = round(event.stream_s, 4)
    return out
