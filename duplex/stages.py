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

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from duplex.events import SpeechStarted, SpeechStopped, TranscriptFinal, TranscriptPartial, Word


@dataclass(frozen=True, slots=True)
class Message:
    """One message of the dialogue as the LLM sees it (built from the conversation record)."""

    role: Literal["user", "assistant"]
    content: str


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
    async def feed(self, pcm: np.ndarray) -> list[SpeechStarted | SpeechStopped]:
        """Consume the next input samples; return speech boundaries found so far."""
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

    def reply(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        """Stream the reply to ``messages`` as text pieces; stop early by closing the iterator."""
        ...

    async def is_backchannel(self, messages: Sequence[Message], text: str) -> bool:
        """Whether ``text``, said by the user while the agent speaks, is a backchannel to talk over
        ("mm-hm", "right") rather than an interruption to yield to."""
        ...

    async def aclose(self) -> None: ...


class LLMModel(Protocol):
    def new_stream(self, system_prompt: str) -> LLMStream: ...


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
