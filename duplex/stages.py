"""The stage contracts every model backend implements (VAD, ASR, LLM, TTS).

Each role has a *model* (loaded once by an :class:`~duplex.agent.Agent`, shared by its sessions) and a
*stream* (one per session, holding exactly the state that must survive between chunks). Stream
methods are coroutines: the backend decides how its compute leaves the event loop (a
:class:`~duplex.worker.ModelWorker` thread, or a :class:`~duplex.engine.scheduler.Scheduler` that
batches the steps of many sessions). Events returned by streams are made on the event loop, with
``stream_samples`` in the 16 kHz input time base and ``wall`` from :func:`duplex.clock.now`.

Audio handed to VAD and ASR streams is float32 mono at 16 kHz in [-1, 1], the next samples of the
session's input (the stream counts them itself). Audio coming out of TTS is float32 mono at the
model's ``sample_rate``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload, runtime_checkable

import numpy as np

from duplex.events import TranscriptFinal, TranscriptPartial, VADEvent, Word
from duplex.tools import ToolCall


@dataclass(frozen=True, slots=True)
class Message:
    """One message of the dialogue as the LLM sees it (built from the conversation record)."""

    role: Literal["user", "assistant", "tool"]
    content: str  # a tool's: its output
    tool_call: ToolCall | None = None  # an assistant message that calls a tool (its content then empty)


class Dialogue(Sequence[Message]):
    """An immutable list of messages in two parts, as the conversation record hands them out.

    ``settled`` is every message but the last; it is one tuple, shared by every view of one version of
    the record (every ASR partial of a turn gets the same object). ``tail`` is the last message, or
    the last two when the user's turn in progress follows the agent's. A consumer that keeps what it
    derived from ``settled`` can skip it when the same object comes back, so the work per partial
    does not grow with the dialogue (the LLM's :class:`~duplex.llm.chat.DialogueTokens` does).
    """

    __slots__ = ("settled", "tail")

    def __init__(self, settled: tuple[Message, ...], tail: tuple[Message, ...]) -> None:
        if settled and not tail:
            raise ValueError("a dialogue's last message belongs to its tail")
        self.settled = settled
        self.tail = tail

    def __len__(self) -> int:
        return len(self.settled) + len(self.tail)

    @overload
    def __getitem__(self, index: int) -> Message: ...
    @overload
    def __getitem__(self, index: slice) -> list[Message]: ...

    def __getitem__(self, index: int | slice) -> Message | list[Message]:
        if isinstance(index, slice):
            return list(self)[index]
        n = len(self.settled)
        if index < 0:
            index += len(self)
            if index < 0:
                raise IndexError("dialogue index out of range")
        return self.settled[index] if index < n else self.tail[index - n]

    def __iter__(self) -> Iterator[Message]:
        yield from self.settled
        yield from self.tail

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dialogue | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Dialogue({list(self)!r})"


def frozen(messages: Sequence[Message]) -> Sequence[Message]:
    """``messages`` as a value no caller can change later (a :class:`Dialogue` already is one)."""
    return messages if isinstance(messages, Dialogue | tuple) else tuple(messages)


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A piece of reply audio and the words it carries.

    ``words`` spans are in samples of the whole reply's audio (offset 0 = first sample of the reply);
    a word appears in the chunk where its audio starts and its span may reach into later chunks.
    """

    pcm: np.ndarray  # [T] float32 at the TTS sample rate
    words: tuple[Word, ...] = ()


@dataclass(frozen=True, slots=True)
class VoicePrompt:
    """A short reference clip and its transcript that set the agent's voice (zero-shot)."""

    pcm: np.ndarray  # [T] float32 mono
    sample_rate: int
    text: str


# -- VAD -------------------------------------------------------------------------------------------


@runtime_checkable
class VADStream(Protocol):
    async def feed(self, pcm: np.ndarray, peek: bool = False) -> list[VADEvent]:
        """Consume the next input samples; return speech boundaries (and voice edges) found so far.
        ``peek``: look at the newest audio before its window is whole (voice found sooner)."""
        ...

    def samples_short(self) -> int:
        """Input samples (at least 1) still missing before a feed without ``peek`` scores a window: a
        feed of fewer only buffers them and returns nothing, so a caller across a process boundary
        holds them back and sends them with the next (``duplex.core.remote``)."""
        ...

    async def aclose(self) -> None: ...


class VADModel(Protocol):
    def new_stream(self) -> VADStream: ...


# -- ASR -------------------------------------------------------------------------------------------


@runtime_checkable
class ASRStream(Protocol):
    async def feed(self, pcm: np.ndarray) -> list[TranscriptPartial | TranscriptFinal]:
        """Consume the next input samples; return new partials, and a final where the model itself
        detects the end of an utterance (an end-of-utterance token)."""
        ...

    def samples_short(self) -> int:
        """Input samples (at least 1) still missing before a feed steps the model: a feed of fewer
        only buffers them and returns nothing (as :meth:`VADStream.samples_short`). 1: any feed may."""
        ...

    async def endpoint(self) -> list[TranscriptFinal]:
        """The VAD heard speech end: finish the current utterance now. Returns its final (nothing if
        no words were recognised) and resets decoding state; encoder caches keep their context."""
        ...

    async def aclose(self) -> None: ...


class ASRModel(Protocol):
    def new_stream(self) -> ASRStream: ...


# -- LLM -------------------------------------------------------------------------------------------


@runtime_checkable
class LLMStream(Protocol):
    async def listen(self, messages: Sequence[Message]) -> float | None:
        """Bring the model's context up to ``messages`` (the dialogue so far, ending with the user's
        words recognised so far). Returns the probability that the user's message is complete, or
        None if the backend has no estimate."""
        ...

    def reply(self, messages: Sequence[Message]) -> AsyncIterator[str | ToolCall]:
        """Stream the reply to ``messages`` as text pieces; stop early by closing the iterator. A
        :class:`~duplex.tools.ToolCall` item ends the reply there: the session runs the tool and asks
        again with the call and its result appended (``Message("tool", output)``)."""
        ...

    async def is_backchannel(self, messages: Sequence[Message], text: str) -> bool:
        """Whether ``text``, said by the user while the agent speaks, is a backchannel to talk over
        ("mm-hm", "right") rather than an interruption to yield to."""
        ...

    async def configure(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> None:
        """From the next call on, the system block says ``system_prompt`` and shows ``tools`` (the
        context is rebuilt under it); a reply already generating finishes under the old one."""
        ...

    async def aclose(self) -> None: ...


class LLMModel(Protocol):
    def new_stream(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> LLMStream:
        """A session's stream; ``tools``: function schemas of what the session's replies may call."""
        ...


# -- TTS -------------------------------------------------------------------------------------------


@runtime_checkable
class TTSStream(Protocol):
    sample_rate: int

    def synthesize(self, text: AsyncIterator[str]) -> AsyncGenerator[AudioChunk, None]:
        """Speak one reply: text pieces in (as the LLM streams them), audio chunks out as soon as
        they are ready. Stop early by closing the iterator (an async generator: the session calls its
        ``aclose``)."""
        ...

    async def aclose(self) -> None: ...


class TTSModel(Protocol):
    sample_rate: int

    def new_stream(self) -> TTSStream: ...


@dataclass(slots=True)
class Stages:
    """The four models a session needs."""

    vad: VADModel
    asr: ASRModel
    llm: LLMModel
    tts: TTSModel
