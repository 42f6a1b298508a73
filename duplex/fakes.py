"""Scripted ASR, LLM and TTS stages with configurable delays: the ``fake`` profile.

They implement the stage contracts of :mod:`duplex.stages` without models, so orchestration (turn
taking, barge-in, cancellation, pacing, the record) is tested deterministically. They are for testing
the plumbing, never the product. Options come from ``AgentConfig.fake[role]``:

- ASR: ``words`` (script cycled through), or ``utterances`` (utterance *i* of a stream recognises
  at most the words of ``utterances[i]``, nothing once they run out), ``word_s`` (voiced seconds
  per recognised word), ``rms`` (voicing threshold), ``delay_s`` (await per packet), ``compute_s``
  (blocking compute per packet on a worker thread), ``fail_at_s`` (raise once the stream passes it).
- LLM: ``replies`` (cycled; default echoes the user), ``ttft_s``, ``token_s``, ``eot`` (the
  end-of-turn probability ``listen`` reports, or None), ``eot_by_text`` (a table: the user's words,
  compared in lower case without punctuation, to the estimate for them) and ``eot_by_words`` (a
  table: a word count, as a TOML key ``"4"``, to the estimate), which come first in that order, so
  "right" can be scripted from a file (``eot = 0.05`` and ``eot_by_words = { "6" = 0.97 }``),
  ``compute_s``.
- TTS: ``word_s`` (audio seconds per word), ``first_chunk_s``, ``rtf`` (await per chunk, as a
  fraction of its duration), ``compute_s``.

``delay_s``-style options wait on the loop clock (free of cost under virtual time); ``compute_s``
blocks a worker thread, like a real model step.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplex.clock import now
from duplex.config import AgentConfig
from duplex.errors import ConfigError
from duplex.events import INPUT_RATE, TranscriptFinal, TranscriptPartial, Word
from duplex.stages import AudioChunk, Message
from duplex.tools import ToolCall
from duplex.worker import ModelWorker

BACKCHANNELS = {"mm-hm", "mhm", "mm", "uh-huh", "yeah", "yes", "right", "okay", "ok", "sure", "i see"}


def _compute(worker: ModelWorker, seconds: float):
    import time

    return worker.run(time.sleep, seconds)


# -- ASR -------------------------------------------------------------------------------------------


@dataclass
class FakeASR:
    words: Sequence[str] = tuple("the quick brown fox jumps over the lazy dog".split())
    utterances: Sequence[str] | None = None
    word_s: float = 0.3
    rms: float = 0.02
    delay_s: float = 0.0
    compute_s: float = 0.0
    rtf: float = 0.0  # seconds it takes per second of audio fed (over 1: slower than real time)
    fail_at_s: float | None = None
    # benchmarks: the word spoken at input second t (the scenario's own text), instead of a script
    word_at: Callable[[float], str | None] | None = None
    worker: ModelWorker = field(default_factory=lambda: ModelWorker("fake-asr"))

    def new_stream(self) -> FakeASRStream:
        return FakeASRStream(self)


class FakeASRStream:
    """Recognises one scripted word per ``word_s`` of voiced audio (10 ms RMS above ``rms``)."""

    def __init__(self, model: FakeASR) -> None:
        self.m = model
        self.pos = 0
        self.voiced = 0
        self.word_start: int | None = None
        self.words: list[Word] = []  # of the open utterance
        self.utterance = 0
        self.next_word = 0

    def take_word(self) -> str | None:
        if self.m.word_at is not None and self.word_start is not None:
            return self.m.word_at(self.word_start / INPUT_RATE)
        if self.m.utterances is not None:
            script = self.m.utterances[self.utterance].split() if self.utterance < len(self.m.utterances) else []
            return script[len(self.words)] if len(self.words) < len(script) else None
        word = self.m.words[self.next_word % len(self.m.words)]
        self.next_word += 1
        return word

    async def feed(self, pcm: np.ndarray) -> list[TranscriptPartial | TranscriptFinal]:
        if self.m.delay_s or self.m.rtf:
            await asyncio.sleep(self.m.delay_s + self.m.rtf * len(pcm) / INPUT_RATE)
        if self.m.compute_s:
            await _compute(self.m.worker, self.m.compute_s)
        if self.m.fail_at_s is not None and self.pos >= self.m.fail_at_s * INPUT_RATE:
            raise RuntimeError("scripted ASR failure")
        before = len(self.words)
        hop = INPUT_RATE // 100
        for i in range(0, len(pcm), hop):
            block = pcm[i:i + hop]
            if block.size and float(np.sqrt(np.mean(block ** 2))) >= self.m.rms:
                if self.word_start is None:
                    self.word_start = self.pos + i
                self.voiced += block.size
                if self.voiced >= self.m.word_s * INPUT_RATE:
                    word = self.take_word()
                    if word is not None:
                        self.words.append(Word(word, self.word_start, self.pos + i + block.size))
                    self.voiced, self.word_start = 0, None
        self.pos += len(pcm)
        if len(self.words) == before:
            return []
        texts = [w.text for w in self.words]
        return [TranscriptPartial(stream_samples=self.pos, wall=now(), stable=" ".join(texts[:-1]),
                                  unstable=texts[-1], words=tuple(self.words))]

    def samples_short(self) -> int:
        """1: it looks at every 10 ms of audio as it comes."""
        return 1

    async def endpoint(self) -> list[TranscriptFinal]:
        words, self.words = self.words, []
        if words:
            self.utterance += 1
        self.voiced, self.word_start = 0, None
        if not words:
            return []
        return [TranscriptFinal(stream_samples=self.pos, wall=now(), text=" ".join(w.text for w in words),
                                words=tuple(words))]

    async def aclose(self) -> None:
        self.words = []


# -- LLM -------------------------------------------------------------------------------------------


@dataclass
class FakeLLM:
    calls_tools = True  # its scripts may call tools ([[name {...}]], see FakeLLMStream)
    replies: Sequence[str] = ()
    ttft_s: float = 0.2
    token_s: float = 0.03
    eot: float | None = None
    compute_s: float = 0.0
    worker: ModelWorker = field(default_factory=lambda: ModelWorker("fake-llm"))
    streams: list[FakeLLMStream] = field(default_factory=list)
    # benchmarks: the end-of-turn probability for the words so far (None: no estimate)
    eot_fn: Callable[[str], float | None] | None = None
    # tests: replaces the backchannel check (a check that fails or stalls)
    is_backchannel_override: Callable[[Sequence[Message], str], Awaitable[bool]] | None = None
    eot_by_text: dict[str, float] = field(default_factory=dict)  # the user's words -> estimate
    eot_by_words: dict[str, float] = field(default_factory=dict)  # word count ("4": TOML keys) -> estimate

    def __post_init__(self) -> None:
        def probability(where: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"fake.llm.{where} must be a probability in [0, 1], got {value!r}")
            return float(value)

        by_words: dict[int, float] = {}
        for key, value in self.eot_by_words.items():
            try:
                count = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"fake.llm.eot_by_words keys are word counts, got {key!r}") from None
            by_words[count] = probability(f"eot_by_words[{key!r}]", value)
        self._eot_by_words = by_words
        self._eot_by_text = {_plain(k): probability(f"eot_by_text[{k!r}]", v) for k, v in self.eot_by_text.items()}

    def estimate(self, text: str) -> float | None:
        """The end-of-turn probability ``listen`` reports for the user's words ``text``."""
        if self.eot_fn is not None:
            return self.eot_fn(text)
        plain = _plain(text)
        if plain in self._eot_by_text:
            return self._eot_by_text[plain]
        return self._eot_by_words.get(len(plain.split()), self.eot)

    def new_stream(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> FakeLLMStream:
        stream = FakeLLMStream(self, system_prompt, tools)
        self.streams.append(stream)
        return stream


TOOL_CALL = re.compile(r"\[\[(\S+)\s*(.*?)\]\]")  # in a scripted reply: [[name {"json": "arguments"}]]


class FakeLLMStream:
    """Scripted replies. A reply may call tools: ``"Let me look. [[weather {"city": "Paris"}]] It is
    {result} there."`` speaks "Let me look.", calls ``weather``, and once asked again with its result
    goes on with the text after the call, ``{result}`` replaced by the tool's output."""

    def __init__(self, model: FakeLLM, system_prompt: str = "", tools: Sequence[dict[str, Any]] = ()) -> None:
        self.m = model
        self.system_prompt, self.tools = system_prompt, tuple(tools)  # what its system block would show
        self.shown: list[list[Message]] = []  # the dialogue each call was given, for tests
        self.replies = 0
        self._rest: list[str] = []  # the current script after its last call: [name, arguments, text, ...]

    def reply_text(self, messages: Sequence[Message]) -> str:
        self.replies += 1
        if self.m.replies:
            return self.m.replies[(self.replies - 1) % len(self.m.replies)]
        last = messages[-1].content if messages else ""
        return f"You said: {last}."

    async def listen(self, messages: Sequence[Message]) -> float | None:
        self.shown.append(list(messages))
        if self.m.compute_s:
            await _compute(self.m.worker, self.m.compute_s)
        return self.m.estimate(messages[-1].content if messages else "")

    async def reply(self, messages: Sequence[Message]) -> AsyncIterator[str | ToolCall]:
        self.shown.append(list(messages))
        if messages and messages[-1].role == "tool" and self._rest:  # going on from a tool's result
            text, self._rest = self._rest[0].replace("{result}", messages[-1].content), self._rest[1:]
        else:
            text, *self._rest = TOOL_CALL.split(self.reply_text(messages))
        await asyncio.sleep(self.m.ttft_s)
        for i, word in enumerate(text.split()):
            if i:
                await asyncio.sleep(self.m.token_s)
            if self.m.compute_s:
                await _compute(self.m.worker, self.m.compute_s)
            yield word if i == 0 else " " + word
        if self._rest:
            name, arguments, self._rest = self._rest[0], self._rest[1], self._rest[2:]
            try:
                parsed = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                parsed = arguments
            yield ToolCall("", name, parsed if isinstance(parsed, dict) else arguments)

    async def is_backchannel(self, messages: Sequence[Message], text: str) -> bool:
        if self.m.is_backchannel_override is not None:  # tests: a check that fails or stalls
            return await self.m.is_backchannel_override(messages, text)
        return re.sub(r"[^\w\s-]", "", text.lower()).strip() in BACKCHANNELS

    async def configure(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> None:
        self.system_prompt, self.tools = system_prompt, tuple(tools)

    async def aclose(self) -> None:
        return None


# -- TTS -------------------------------------------------------------------------------------------


@dataclass
class FakeTTS:
    sample_rate: int = 24_000
    word_s: float = 0.3
    first_chunk_s: float = 0.1
    rtf: float = 0.0
    compute_s: float = 0.0
    worker: ModelWorker = field(default_factory=lambda: ModelWorker("fake-tts"))

    def new_stream(self) -> FakeTTSStream:
        return FakeTTSStream(self)

    def tone(self, word: str) -> np.ndarray:
        """A beep per word: its pitch from the word, a short fade in and out."""
        n = int(self.word_s * self.sample_rate)
        freq = 220.0 + zlib.crc32(word.encode()) % 440
        t = np.arange(n, dtype=np.float32) / self.sample_rate
        env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01).astype(np.float32)
        return (0.3 * env * np.sin(2 * np.pi * freq * t)).astype(np.float32)


class FakeTTSStream:
    """Speaks each complete word of the incoming text as a beep, with exact word spans."""

    def __init__(self, model: FakeTTS) -> None:
        self.m = model
        self.sample_rate = model.sample_rate

    async def synthesize(self, text: AsyncIterator[str]) -> AsyncGenerator[AudioChunk, None]:
        buffer, offset, first = "", 0, True

        async def speak(word: str) -> AudioChunk:
            nonlocal offset, first
            if first:
                await asyncio.sleep(self.m.first_chunk_s)
                first = False
            pcm = self.m.tone(word)
            if self.m.rtf:
                await asyncio.sleep(self.m.rtf * len(pcm) / self.sample_rate)
            if self.m.compute_s:
                await _compute(self.m.worker, self.m.compute_s)
            chunk = AudioChunk(pcm, (Word(word, offset, offset + len(pcm)),))
            offset += len(pcm)
            return chunk

        async for piece in text:
            buffer += piece
            *complete, buffer = re.split(r"\s+", buffer)
            for word in complete:
                if word:
                    yield await speak(word)
        if buffer.strip():
            yield await speak(buffer.strip())

    async def aclose(self) -> None:
        return None


def _plain(text: str) -> str:
    """Words as the fake LLM's estimate tables compare them: lower case, no punctuation."""
    return " ".join(re.findall(r"[\w'-]+", text.lower()))


def build(role: str, config: AgentConfig) -> Any:
    """The fake model of ``role`` with options from ``config.fake[role]``."""
    cls = {"asr": FakeASR, "llm": FakeLLM, "tts": FakeTTS}[role]
    options = dict(config.fake.get(role, {}))  # type: ignore[call-overload]
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad option for the fake {role}: {exc}") from exc
