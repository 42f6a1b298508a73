"""One conversation: the public Session API, and the turn policy's actions dealt out to the session's parts.

A session is four concerns, each in a module of its own::

    push_audio ─► Intake (duplex.intake) ─► [vad queue] ─► VAD task ─┐   Listening (duplex.listening)
                  convert, time, queue    └► [asr queue] ─► ASR task ─┼─► policy (duplex.turns) ─► actions
                                                           listen task┘        ▲            │
    Speaking (duplex.speaking):                                                │            ▼
    reply task: LLM.reply ─► TTS.synthesize ─► Playout ─► playout task (20 ms) ─► audio()  Session._apply
                                                          └─ playback position ─► conversation record

This module holds the API (push audio, subscribe to events and audio, configure, close) and what the
parts share: the record (:class:`~duplex.conversation.Conversation`), the policy
(:class:`~duplex.turns.TurnPolicy`), the LLM stream (listening prefills the user's words into it,
speaking generates from it), the event subscriptions, the agent's state and the session's tasks.
Handlers of stage output are plain synchronous methods (no queue hop per frame): a barge-in pauses
playout within the same loop iteration that sees the VAD's speech start, and the next 20 ms frame is
silence. Each reply is a :class:`~duplex.reply.Reply` handle with an id, stopped by one call; the
playout refuses audio of any other id, so a stopped reply can never reach the speaker.

Replies are speculative first: when the user's speech stops with words, a reply to them is made at
once (LLM, then TTS) with its audio held in the playout and its events held in the reply; the end of
the turn commits it if it answers the same words (else it is withdrawn and a fresh one starts), and
speech before that withdraws it: nothing of it is played, emitted or recorded, and the LLM's next
listen rolls its cache back to the user's words.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from duplex import events as ev
from duplex.clock import now
from duplex.config import AgentConfig
from duplex.conversation import AgentTurn, Conversation
from duplex.events import Event
from duplex.intake import Intake
from duplex.listening import Listening
from duplex.playout import Playout
from duplex.recording import Recording
from duplex.speaking import Speaking
from duplex.stages import Stages
from duplex.subscription import Subscription
from duplex.tools import Tool, tool_table
from duplex.turns import (Action, CancelReply, CheckBargeIn, EndTurn, Interrupt, Pause, Resume, Speculate,
                          TurnPolicy, Withdraw)

log = logging.getLogger(__name__)


class Session:
    """One conversation with the agent. Create it with :meth:`duplex.Agent.session` inside a running
    event loop; feed it with :meth:`push_audio`; read :meth:`events` and :meth:`audio`; :meth:`close`."""

    def __init__(self, stages: Stages, config: AgentConfig, *, name: str = "session",
                 on_close: Callable[[Session], None] | None = None, record: str | os.PathLike[str] | None = None,
                 resume: Conversation | None = None, tools: dict[str, Tool] | None = None) -> None:
        self.name = name
        self._on_close = on_close
        self.config = config
        self.output_rate: int = stages.tts.sample_rate
        # the record; ``resume``: an earlier session's, continued (its turns are this session's
        # LLM context too, which follows the record)
        self.conversation = resume if resume is not None else Conversation(config.system_prompt)
        self.policy = TurnPolicy(config.turn)
        self.tools = tools or {}  # what replies may call (duplex.tools)
        # both sides on one clock and the transcript heard, written at close (duplex.recording)
        self.recording = Recording(record, self.output_rate, earlier=self.conversation.turns) \
            if record is not None else None
        vad, asr = stages.vad.new_stream(), stages.asr.new_stream()
        # the tools' schemas go to the LLM's system block (a model that calls none ignores them); the
        # system prompt is the record's (a resumed conversation keeps the one it was given)
        self._llm = stages.llm.new_stream(self.conversation.system_prompt, [t.schema() for t in self.tools.values()])
        self.calls_tools = bool(getattr(stages.llm, "calls_tools", False))  # whether its LLM can call tools
        tts = stages.tts.new_stream()
        self.t0 = now()
        self.closed = False
        self.state: ev.AgentStateName = "listening"
        self._event_subs: list[Subscription[Event]] = []
        # Seconds from a frame leaving audio() to the listener's ear that the transport adds (a WebRTC
        # jitter buffer, a sound card's output buffer); the transport sets it, and it counts in the
        # voice-to-voice figure. It does not move the heard-word cut: transports never drop audio
        # they have taken from audio(), so every frame emitted before a barge-in is played out.
        self.output_latency_s = 0.0
        self.intake = Intake(self._overloaded)
        self.listening = Listening(self, vad, asr)
        last_id = max((t.reply_id for t in self.conversation.turns if isinstance(t, AgentTurn)), default=0)
        self.speaking = Speaking(self, tts, self.output_rate, last_id)
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._closing: asyncio.Future[None] | None = None
        self._tasks = [
            asyncio.create_task(self._guard(self.listening.vad_loop, "vad"), name=f"{name}-vad"),
            asyncio.create_task(self._guard(self.listening.asr_loop, "asr"), name=f"{name}-asr"),
            asyncio.create_task(self._guard(self.speaking.playout_loop, "playout"), name=f"{name}-playout"),
        ]

    # -- public API ------------------------------------------------------------------------------

    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Feed user audio: any rate in 8-192 kHz, mono ``[T]`` or ``[T, channels]``, int16/int32 or
        float in [-1, 1]. It is converted to 16 kHz mono float32 here (see
        :func:`duplex.audio.to_mono_float`). Raises :class:`~duplex.errors.AudioFormatError` for audio
        that cannot be used. Feed it continuously, silence included, as a live source does: the
        session's sense of time (end of turn, false interruptions) is the audio it has received."""
        if self.closed:
            raise RuntimeError(f"{self.name} is closed; start a new session")
        block = self.intake.push(pcm, sample_rate)
        if block is None:
            return
        if self.recording is not None:
            self.recording.user(block)
        self._emit(ev.AudioIn(stream_samples=self.intake.pushed, wall=now(), samples=block.size))

    def events(self, maxsize: int = 10_000) -> Subscription[Event]:
        """Every event from now on (see :mod:`duplex.events`)."""
        sub: Subscription[Event] = Subscription(maxsize)
        self._event_subs.append(sub)
        if self.closed:
            sub.close()
        return sub

    def audio(self, maxsize: int = 50, *, live: bool = False) -> Subscription[np.ndarray]:
        """The agent's voice: one float32 frame of 20 ms at :attr:`output_rate` every 20 ms, silence
        when it is not speaking. ``live``: a speaker or a wire, where a barge-in must be heard at once:
        frames of the reply still unread when the agent pauses are taken back (they play again on
        resume and never count as heard). A recording leaves it off and gets every frame."""
        sub = self.speaking.subscribe(maxsize, live)
        if self.closed:
            sub.close()
        return sub

    async def configure(self, *, instructions: str | None = None, tools: Sequence[Tool] | None = None) -> None:
        """Change what the agent is told (its system prompt, kept in the record) and the tools its
        replies may call; the LLM's context is rebuilt under the new system block before its next call
        (a reply already generating finishes under the old one). ``None`` leaves that part as it is."""
        if self.closed:
            raise RuntimeError(f"{self.name} is closed; start a new session")
        if tools is not None:
            self.tools = tool_table(tools)
        if instructions is not None:
            self.conversation.system_prompt = instructions
        await self._llm.configure(self.conversation.system_prompt, [t.schema() for t in self.tools.values()])

    def stage_stats(self) -> dict[str, dict[str, float]]:
        """Figures the stage streams report about themselves (e.g. the LLM's KV-cache size), by role."""
        out: dict[str, dict[str, float]] = {}
        for role, stream in self._streams():
            stats = getattr(stream, "stats", None)
            if callable(stats):
                out[role] = stats()
        return out

    @property
    def playout(self) -> Playout:
        """The agent's output buffer (its underruns, what plays now)."""
        return self.speaking.playout

    @property
    def position(self) -> int:
        """Input samples the session has listened to: the stream time of its events."""
        return self.listening.position

    @property
    def lag_s(self) -> float:
        """Seconds of input audio waiting for the VAD or the ASR (0 when the models keep up)."""
        return self.intake.lag_s

    def arrival(self, sample: int) -> float:
        """The wall time at which input stream sample ``sample`` was spoken (arrived)."""
        return self.intake.arrival(sample)

    async def close(self) -> None:
        """Stop every task, close the stage streams and keep the record whole: a reply being played
        is kept as interrupted at its playback position; words not yet in a turn become one.

        Every call waits for the one closing (a second call, or a caller cancelled meanwhile, never
        cuts it short)."""
        self.closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self.speaking.close()
        pending = self.policy.user_text
        if pending:
            self.conversation.user_turn_ended(pending, self.listening.turn_start, self.intake.pushed, now())
        # every reply's task: the one playing, a withdrawn speculation, stopped ones still unwinding
        tasks = [t for t in (*self._tasks, *self._side_tasks, *self.speaking.tasks, self.listening.listen_task)
                 if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, stream in self._streams():
            try:
                await stream.aclose()
            except Exception:  # closing must go on for the others
                log.exception("%s: closing %s failed", self.name, type(stream).__name__)
        if self.recording is not None:
            try:
                await self.recording.close(self.conversation)
            except Exception:  # the session still closes; the folder says what was written
                log.exception("%s: writing the recording to %s failed", self.name, self.recording.folder)
        subs: list[Subscription[Any]] = [*self._event_subs, *self.speaking.audio_subs]
        for sub in subs:
            sub.close()
        if self._on_close is not None:
            self._on_close(self)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the parts share --------------------------------------------------------------------

    def _streams(self) -> tuple[tuple[str, Any], ...]:
        return (("vad", self.listening.vad), ("asr", self.listening.asr), ("llm", self._llm),
                ("tts", self.speaking.tts))

    def _emit(self, event: Event) -> None:
        if self.recording is not None:
            self.recording.event(event, self.t0)
        for sub in self._event_subs:
            sub.publish(event)

    def _overloaded(self, message: str) -> None:
        """The intake starts or stops dropping input because the models are behind."""
        self._emit(ev.Error(stream_samples=self.intake.pushed, wall=now(), stage="input", message=message))

    def _set_state(self, state: ev.AgentStateName) -> None:
        if state != self.state:
            self.state = state
            self._emit(ev.AgentState(stream_samples=self.position, wall=now(), state=state))

    async def _guard(self, loop: Callable[[], Awaitable[None]], stage: str) -> None:
        """Run a pipeline task; a failure becomes an Error event and ends the session cleanly."""
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.name, stage)
            self._emit(ev.Error(stream_samples=self.position, wall=now(), stage=stage,
                                message=f"{type(exc).__name__}: {exc}", fatal=True))
            self._spawn(self._guard_soft("session", self.close))

    async def _guard_soft(self, stage: str, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a helper task whose failure is reported but does not end the session."""
        try:
            await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.name, stage)
            self._emit(ev.Error(stream_samples=self.position, wall=now(), stage=stage,
                                message=f"{type(exc).__name__}: {exc}"))

    def _spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` beside the pipeline; closing the session cancels it."""
        task = asyncio.ensure_future(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _apply(self, actions: list[Action]) -> None:
        """Deal the policy's actions out to the part that carries each."""
        speaking = self.speaking
        for action in actions:
            if isinstance(action, EndTurn):
                speaking.end_turn(action)
            elif isinstance(action, Pause):
                speaking.pause(action.speech_start)
            elif isinstance(action, CheckBargeIn):
                self._spawn(self._guard_soft("llm", self.listening.check, action.text))
            elif isinstance(action, Resume):
                speaking.resume()
            elif isinstance(action, (Interrupt, CancelReply)):
                speaking.stop(heard=isinstance(action, Interrupt))
                self.listening.want_listen()
            elif isinstance(action, Speculate):
                speaking.speculate(action.text)
            elif isinstance(action, Withdraw):
                speaking.withdraw()
