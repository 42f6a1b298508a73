"""One conversation: the pipeline of stages as asyncio tasks, and the public Session API.

Tasks of a session (all on the event loop; model compute happens inside the stage streams, on
worker threads)::

    push_audio ─► [vad queue] ─► VAD task ─┐
               └► [asr queue] ─► ASR task ─┼─► policy (duplex.turns) ─► actions
                                           │        ▲
    reply task: LLM.reply ─► TTS.synthesize ─► Playout ─► playout task (one frame / 20 ms) ─► audio()
                                                          └─ playback position ─► conversation record

Handlers of stage output are plain synchronous methods (no queue hop per frame): a barge-in pauses
playout within the same loop iteration that sees the VAD's speech start, and the next 20 ms frame is
silence. Each reply is a :class:`~duplex.reply.Reply` with an id; the playout refuses audio of any
other id, so a cancelled reply can never reach the speaker.

Replies are speculative first: when the user's speech stops with words, a reply to them is made at
once (LLM, then TTS) with its audio held in the playout and its events held in the reply; the end of
the turn commits it if it answers the same words (else it is withdrawn and a fresh one starts), and
speech before that withdraws it: nothing of it is played, emitted or recorded, and the LLM's next
listen rolls its cache back to the user's words.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from duplex import events as ev
from duplex.audio import StreamResampler, to_mono_float
from duplex.clock import now
from duplex.config import AgentConfig
from duplex.conversation import AgentTurn, Conversation, ToolUse
from duplex.errors import AudioFormatError
from duplex.events import INPUT_RATE, Event
from duplex.playout import Frame, Playout
from duplex.recording import MAX_EXTRAPOLATION_S, Recording
from duplex.tools import MAX_CALLS_PER_REPLY, Tool, ToolCall, ToolOutcome, run_call, tool_table
from duplex.reply import Reply, TurnTiming
from duplex.stages import Message, Stages
from duplex.turns import (Action, CancelReply, CheckBargeIn, EndTurn, Interrupt, Pause, Phase, Resume,
                          Speculate, TurnPolicy, Withdraw)

log = logging.getLogger(__name__)

T = TypeVar("T")
_CLOSED = object()
_ENDPOINT = object()  # marker in the ASR queue: the VAD heard the end of speech here

MIN_RATE, MAX_RATE = 8_000, 192_000
MAX_QUEUED_S = 10.0  # audio waiting for a lagging VAD/ASR before input is dropped ...
RESUME_QUEUED_S = 5.0  # ... until the backlog is down to this
PROGRESS_EVERY = 10  # frames between PlaybackProgress events (200 ms)


async def _aclose(iterator: object) -> None:
    """Close an async iterator that can be closed (the LLM's token streams are async generators)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not merely an awaited call that was).
    Python 3.10 cannot tell: there any cancellation counts as the task's own."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


class Subscription(Generic[T]):
    """An async iterator over what a session publishes, registered when created (nothing is missed).

    Bounded: a consumer that falls behind loses the oldest items, never blocks the session."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.dropped = 0
        # A live audio output that keeps frames of its own after reading them (a sound card's
        # queue) sets this: at a pause it drops those not played yet and returns how many.
        self.take_back: Callable[[], int] | None = None

    def queued(self) -> int:
        """Items published but not read yet."""
        return self._queue.qsize()

    def drop_newest(self, n: int) -> None:
        """Forget the ``n`` newest unread items (a live audio output's frames not heard yet)."""
        items = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for item in items[:len(items) - n]:
            self._queue.put_nowait(item)

    def _put(self, item: object) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # stay closed for further reads
            raise StopAsyncIteration
        return item  # type: ignore[return-value]


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
        self.playout = Playout(self.output_rate)
        self.tools = tools or {}  # what replies may call (duplex.tools)
        # both sides on one clock and the transcript heard, written at close (duplex.recording)
        self.recording = Recording(record, self.output_rate, earlier=self.conversation.turns) \
            if record is not None else None
        self._vad = stages.vad.new_stream()
        self._asr = stages.asr.new_stream()
        # the tools' schemas go to the LLM's system block (a model that calls none ignores them); the
        # system prompt is the record's (a resumed conversation keeps the one it was given)
        self._llm = stages.llm.new_stream(self.conversation.system_prompt, [t.schema() for t in self.tools.values()])
        self.calls_tools = bool(getattr(stages.llm, "calls_tools", False))  # whether its LLM can call tools
        self._tts = stages.tts.new_stream()
        self.t0 = now()
        self.closed = False
        self.state: ev.AgentStateName = "listening"
        self._event_subs: list[Subscription[Event]] = []
        self._audio_subs: list[Subscription[np.ndarray]] = []
        self._live_subs: list[Subscription[np.ndarray]] = []  # speakers and wires (see audio())
        self._resampler: StreamResampler | None = None
        self._pushed = 0  # input samples (16 kHz) handed to the models
        self._arrival_ends: list[int] = []  # stream sample at the end of each pushed block ...
        self._arrival_walls: list[float] = []  # ... and when it arrived
        self._queued_s = {"vad": 0.0, "asr": 0.0}  # seconds of audio waiting in each queue
        self._dropped_s = 0.0  # input dropped in the overload going on now
        self.dropped_input_s = 0.0  # ... and in earlier ones
        self._vad_q: asyncio.Queue[object] = asyncio.Queue()
        self._asr_q: asyncio.Queue[object] = asyncio.Queue()
        self._vad_pos = 0
        self._turn_start = 0
        self._last_final_wall = self.t0
        self._reply_id = max((t.reply_id for t in self.conversation.turns if isinstance(t, AgentTurn)), default=0)
        self._current: Reply | None = None  # the committed reply (playing, or about to)
        self._spec: Reply | None = None  # a speculative reply, made while the policy decides
        self.speculations = {"started": 0, "committed": 0, "withdrawn": 0}
        # What each ASR partial costs the event loop (the events, the policy, the record's messages
        # for the LLM), in CPU seconds of this thread: the long-dialogue benchmark watches it stay flat.
        self.partials = 0
        self.partial_cpu_s = 0.0
        self._pause_start: int | None = None  # speech onset of a barge-in not yet silenced
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_wanted = False
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._reply_tasks: set[asyncio.Task[None]] = set()  # every reply's, until it has ended
        self._closing: asyncio.Future[None] | None = None
        self._frames = 0
        # Seconds from a frame leaving audio() to the listener's ear that the transport adds (a WebRTC
        # jitter buffer, a sound card's output buffer); the transport sets it, and it counts in the
        # voice-to-voice figure. It does not move the heard-word cut: transports never drop audio
        # they have taken from audio(), so every frame emitted before a barge-in is played out.
        self.output_latency_s = 0.0
        self._tasks = [
            asyncio.create_task(self._guard(self._vad_loop, "vad"), name=f"{name}-vad"),
            asyncio.create_task(self._guard(self._asr_loop, "asr"), name=f"{name}-asr"),
            asyncio.create_task(self._guard(self._playout_loop, "playout"), name=f"{name}-playout"),
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
        if isinstance(sample_rate, (int, np.integer)) and not (MIN_RATE <= sample_rate <= MAX_RATE):
            raise AudioFormatError(f"sample rate {sample_rate} Hz is not supported; give audio at "
                                   f"{MIN_RATE}-{MAX_RATE} Hz (16000 or 48000 are typical)")
        mono = to_mono_float(pcm, sample_rate)
        if mono.size == 0:
            raise AudioFormatError("empty audio block: push at least one sample")
        if self._resampler is None or self._resampler.in_rate != sample_rate:
            self._resampler = StreamResampler(sample_rate, INPUT_RATE)
        block = self._resampler(mono)
        if block.size == 0:
            return
        lag = self.lag_s
        limit = RESUME_QUEUED_S if self._dropped_s else MAX_QUEUED_S  # hysteresis: one episode, not a flicker
        if lag > limit:  # one event when an overload starts, one when it ends (not one per block)
            if self._dropped_s == 0.0:
                self._emit(ev.Error(stream_samples=self._pushed, wall=now(), stage="input",
                                    message=f"the models are {lag:.1f} s behind the audio; dropping input "
                                            "until they catch up"))
            self._dropped_s += block.size / INPUT_RATE
            return
        if self._dropped_s:
            self._emit(ev.Error(stream_samples=self._pushed, wall=now(), stage="input",
                                message=f"dropped {self._dropped_s:.1f} s of input while the models were behind"))
            self.dropped_input_s += self._dropped_s
            self._dropped_s = 0.0
        if self.recording is not None:
            self.recording.user(block)
        self._pushed += block.size
        self._arrival_ends.append(self._pushed)
        self._arrival_walls.append(now())
        if len(self._arrival_ends) > 60_000:  # keep 10-20 minutes: lookups are for recent speech
            del self._arrival_ends[:30_000], self._arrival_walls[:30_000]
        for key, queue in (("vad", self._vad_q), ("asr", self._asr_q)):
            self._queued_s[key] += block.size / INPUT_RATE
            queue.put_nowait(block)
        self._emit(ev.AudioIn(stream_samples=self._pushed, wall=now(), samples=block.size))

    def events(self, maxsize: int = 10_000) -> Subscription[Event]:
        """Every event from now on (see :mod:`duplex.events`)."""
        sub: Subscription[Event] = Subscription(maxsize)
        self._event_subs.append(sub)
        if self.closed:
            sub._put(_CLOSED)
        return sub

    def audio(self, maxsize: int = 50, *, live: bool = False) -> Subscription[np.ndarray]:
        """The agent's voice: one float32 frame of 20 ms at :attr:`output_rate` every 20 ms, silence
        when it is not speaking. ``live``: a speaker or a wire, where a barge-in must be heard at once:
        frames of the reply still unread when the agent pauses are taken back (they play again on
        resume and never count as heard). A recording leaves it off and gets every frame."""
        sub: Subscription[np.ndarray] = Subscription(maxsize)
        self._audio_subs.append(sub)
        if live:
            self._live_subs.append(sub)
        if self.closed:
            sub._put(_CLOSED)
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
        for role, stream in (("vad", self._vad), ("asr", self._asr), ("llm", self._llm), ("tts", self._tts)):
            stats = getattr(stream, "stats", None)
            if callable(stats):
                out[role] = stats()
        return out

    @property
    def lag_s(self) -> float:
        """Seconds of input audio waiting for the VAD or the ASR (0 when the models keep up)."""
        return max(self._queued_s.values())

    def arrival(self, sample: int) -> float:
        """The wall time at which input stream sample ``sample`` was spoken (arrived)."""
        i = bisect.bisect_left(self._arrival_ends, sample)
        if i >= len(self._arrival_ends):
            return now()
        return self._arrival_walls[i] - (self._arrival_ends[i] - sample) / INPUT_RATE

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
        self._withdraw()
        if self._reply is not None and not self._reply.done:
            self._finish_reply(interrupted=True)
        pending = self.policy.user_text
        if pending:
            self.conversation.user_turn_ended(pending, self._turn_start, self._pushed, now())
        # every reply's task: the one playing, a withdrawn speculation, stopped ones still unwinding
        tasks = [t for t in (*self._tasks, *self._side_tasks, *self._reply_tasks, self._listen_task)
                 if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in (self._vad, self._asr, self._llm, self._tts):
            try:
                await stream.aclose()
            except Exception:  # closing must go on for the others
                log.exception("%s: closing %s failed", self.name, type(stream).__name__)
        if self.recording is not None:
            try:
                await self.recording.close(self.conversation)
            except Exception:  # the session still closes; the folder says what was written
                log.exception("%s: writing the recording to %s failed", self.name, self.recording.folder)
        subs: list[Subscription[Any]] = [*self._event_subs, *self._audio_subs]
        for sub in subs:
            sub._put(_CLOSED)
        if self._on_close is not None:
            self._on_close(self)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _reply(self) -> AgentTurn | None:
        """The record of the committed reply."""
        return self._current.record if self._current is not None else None

    # -- plumbing --------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self.recording is not None:
            self.recording.event(event, self.t0)
        for sub in self._event_subs:
            sub._put(event)

    def _set_state(self, state: ev.AgentStateName) -> None:
        if state != self.state:
            self.state = state
            self._emit(ev.AgentState(stream_samples=self._vad_pos, wall=now(), state=state))

    async def _guard(self, loop: Callable[[], Awaitable[None]], stage: str) -> None:
        """Run a pipeline task; a failure becomes an Error event and ends the session cleanly."""
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.name, stage)
            self._emit(ev.Error(stream_samples=self._vad_pos, wall=now(), stage=stage,
                                message=f"{type(exc).__name__}: {exc}", fatal=True))
            self._spawn(self._guard_soft("session", self.close))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- listening -------------------------------------------------------------------------------

    async def _vad_loop(self) -> None:
        while True:
            block = await self._vad_q.get()
            assert isinstance(block, np.ndarray)
            # while the agent speaks, the VAD also looks at audio short of a whole window: the user's
            # voice pauses the agent up to a window sooner
            found = await self._vad.feed(block, peek=self.policy.phase is Phase.SPEAKING)
            self._vad_pos += block.size
            self._queued_s["vad"] -= block.size / INPUT_RATE
            for event in found:
                self._emit(event)
                if isinstance(event, ev.VoiceEdge):
                    self._apply(self.policy.voice_edge(event.at, event.voiced))
                elif isinstance(event, ev.SpeechStarted):
                    if not self.policy.user_text:
                        self._turn_start = event.start
                    self._apply(self.policy.speech_started(event.start))
                else:
                    self._asr_q.put_nowait(_ENDPOINT)
                    self._apply(self.policy.speech_stopped(event.end))
            self._apply(self.policy.advance(self._vad_pos))

    async def _asr_loop(self) -> None:
        while True:
            item = await self._asr_q.get()
            finals: Sequence[ev.TranscriptPartial | ev.TranscriptFinal]
            if item is _ENDPOINT:
                finals = await self._asr.endpoint()
                self._last_final_wall = now()
                if not finals:
                    self._apply(self.policy.final(""))
            else:
                assert isinstance(item, np.ndarray)
                finals = await self._asr.feed(item)  # partials and model-detected finals
                self._queued_s["asr"] -= item.size / INPUT_RATE
            for event in finals:
                cpu = time.thread_time()
                self._emit(event)
                if isinstance(event, ev.TranscriptFinal):
                    self._last_final_wall = event.wall
                    self._apply(self.policy.final(event.text, event.eou))
                else:
                    self._apply(self.policy.transcript(event.text))
                    self.partials += 1
                self._want_listen()
                self.partial_cpu_s += time.thread_time() - cpu

    def _want_listen(self) -> None:
        """Let the LLM prefill the user's words as they come (coalesced: one call in flight)."""
        if self.policy.phase is not Phase.LISTENING or not self.policy.user_text:
            return
        self._listen_wanted = True
        if self._listen_task is None or self._listen_task.done():
            self._listen_task = asyncio.create_task(self._guard_soft("llm", self._listen_loop))

    async def _listen_loop(self) -> None:
        while self._listen_wanted and self.policy.phase is Phase.LISTENING:
            self._listen_wanted = False
            text = self.policy.user_text
            cpu = time.thread_time()
            messages = self.conversation.messages(text)
            self.partial_cpu_s += time.thread_time() - cpu
            p = await self._llm.listen(messages)
            if p is not None:
                self._emit(ev.EndOfTurnEstimate(stream_samples=self._vad_pos, wall=now(), probability=p))
                self._apply(self.policy.eot_estimate(p, text))

    async def _guard_soft(self, stage: str, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a helper task whose failure is reported but does not end the session."""
        try:
            await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.name, stage)
            self._emit(ev.Error(stream_samples=self._vad_pos, wall=now(), stage=stage,
                                message=f"{type(exc).__name__}: {exc}"))

    # -- policy actions --------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, EndTurn):
                self._end_turn(action)
            elif isinstance(action, Pause):
                self.playout.pause()
                self._take_back_unheard()
                self._pause_start = action.speech_start
                if self._reply is not None:
                    self._emit(ev.BargeIn(stream_samples=self._vad_pos, wall=now(),
                                          reply_id=self._reply.reply_id, speech_start=action.speech_start))
                self._set_state("listening")
            elif isinstance(action, CheckBargeIn):
                self._spawn(self._guard_soft("llm", self._check, action.text))
            elif isinstance(action, Resume):
                self.playout.resume()
                self._pause_start = None
                if self._reply is not None:
                    self._emit(ev.Resumed(stream_samples=self._vad_pos, wall=now(), reply_id=self._reply.reply_id))
                    self._set_state("speaking")
            elif isinstance(action, Interrupt):
                self._stop_reply(heard=True)
                self._want_listen()
            elif isinstance(action, CancelReply):
                self._stop_reply(heard=False)
                self._want_listen()
            elif isinstance(action, Speculate):
                self._speculate(action.text)
            elif isinstance(action, Withdraw):
                self._withdraw()

    async def _check(self, text: str) -> None:
        """Ask whether ``text`` (said over the agent) is a backchannel; a failed check, one cancelled
        under it (the engine or the core dropped the call), or one not answered within
        ``turn.check_timeout_s`` is a verdict too (None: yield), so the pause never waits on it for
        long. Only this task being cancelled (the session closing) ends it without a verdict."""
        backchannel: bool | None = False
        turn = self.config.turn
        if turn.backchannels:
            try:
                backchannel = await asyncio.wait_for(self._llm.is_backchannel(self.conversation.messages(), text),
                                                     turn.check_timeout_s)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and _cancelling():
                    raise
                why = (f"no answer within {turn.check_timeout_s} s (turn.check_timeout_s)"
                       if isinstance(exc, asyncio.TimeoutError) else
                       "the call was cancelled" if isinstance(exc, asyncio.CancelledError) else
                       f"{type(exc).__name__}: {exc}")
                log.warning("%s: the backchannel check failed (%s); yielding", self.name, why)
                self._emit(ev.Error(stream_samples=self._vad_pos, wall=now(), stage="llm",
                                    message=f"backchannel check failed: {why}"))
                backchannel = None
        self._apply(self.policy.barge_in_verdict(backchannel, text))

    def _new_reply(self, text: str, *, speculative: bool) -> Reply:
        """Start generating a reply to ``text`` (speculative: held back, out of the record)."""
        self._reply_id += 1
        rid, wall = self._reply_id, now()
        record = AgentTurn(reply_id=rid, turn=-1, sample_rate=self.output_rate, started_wall=wall)
        end = self.policy.speech_end if self.policy.speech_end is not None else self._vad_pos
        timing = TurnTiming(speech_end_wall=self.arrival(end), final_wall=self._last_final_wall, turn_end_wall=wall)
        reply = Reply(rid, text, record, timing, speculative)
        self.playout.start_reply(rid, held=speculative)
        messages = self.conversation.messages(text) if speculative else self.conversation.messages()
        reply.task = asyncio.create_task(self._reply_loop(reply, messages), name=f"{self.name}-reply-{rid}")
        self._reply_tasks.add(reply.task)
        reply.task.add_done_callback(self._reply_tasks.discard)
        return reply

    def _speculate(self, text: str) -> None:
        """The user's speech stopped: make the reply to ``text`` now, holding it back."""
        self._withdraw()
        if self._current is not None and not self._current.record.done:
            return  # a committed reply still owns the output (the policy would not ask for this)
        self._spec = self._new_reply(text, speculative=True)
        self.speculations["started"] += 1
        self._emit(ev.Metric(stream_samples=self._vad_pos, wall=now(), name="speculation_started", value=1.0))

    def _withdraw(self) -> None:
        """The speculative reply vanishes: its generation stops, its audio is dropped, and nothing
        of it was emitted or recorded."""
        spec, self._spec = self._spec, None
        if spec is None:
            return
        spec.cancel()
        if self.playout.active == spec.reply_id:
            self.playout.drop()
        self.speculations["withdrawn"] += 1
        self._emit(ev.Metric(stream_samples=self._vad_pos, wall=now(), name="speculation_withdrawn", value=1.0))

    def _end_turn(self, action: EndTurn) -> None:
        wall = now()
        turn = self.conversation.user_turn_ended(action.text, self._turn_start, action.speech_end, wall)
        self._emit(ev.TurnEnded(stream_samples=self._vad_pos, wall=wall, turn=turn.index, text=action.text,
                                speech_end=action.speech_end))
        spec = self._spec
        if spec is not None and spec.answers == action.text:  # the reply is already being made: commit it
            self._spec = None
            reply = spec
            held = reply.commit()
            self.speculations["committed"] += 1
        else:
            self._withdraw()
            reply, held = self._new_reply(action.text, speculative=False), []
        reply.record.turn, reply.record.started_wall = turn.index, wall
        reply.timing.speech_end_wall = self.arrival(action.speech_end)
        reply.timing.final_wall, reply.timing.turn_end_wall = self._last_final_wall, wall
        self.conversation.add_reply(reply.record)
        self._current = reply
        self._emit(ev.ReplyStarted(stream_samples=self._vad_pos, wall=wall, reply_id=reply.reply_id,
                                   turn=turn.index))
        for event in held:
            self._emit(event)
        self.playout.release(reply.reply_id)
        self._set_state("thinking")

    def _stop_reply(self, heard: bool) -> None:
        """Barge-in confirmed (``heard``) or the user went on before any audio (not heard)."""
        reply = self._reply
        self.playout.drop()
        if self._current is not None:
            self._current.cancel()
        self._pause_start = None
        if reply is None or reply.done:
            return
        if heard:
            self._finish_reply(interrupted=True)
        else:
            self.conversation.reply_cancelled_unheard(reply.reply_id)
            self._emit(ev.ReplyDone(stream_samples=self._vad_pos, wall=now(), reply_id=reply.reply_id,
                                    text=reply.text, heard="", interrupted=True))
            self._current = None
        self._set_state("listening")

    def _finish_reply(self, interrupted: bool) -> None:
        reply = self._reply
        assert reply is not None
        self.conversation.reply_closed(reply.reply_id, interrupted)
        wall = now()
        if interrupted:
            self._emit(ev.Interrupted(stream_samples=self._vad_pos, wall=wall, reply_id=reply.reply_id,
                                      heard=reply.heard, played=reply.played))
        self._emit(ev.ReplyDone(stream_samples=self._vad_pos, wall=wall, reply_id=reply.reply_id,
                                text=reply.text, heard=reply.heard, interrupted=interrupted))
        self._current = None

    # -- speaking --------------------------------------------------------------------------------

    def _emit_for(self, reply: Reply, event: Event) -> None:
        """An event of ``reply``: held back while it is speculative."""
        if reply.speculative:
            reply.held.append(event)
        else:
            self._emit(event)

    async def _reply_loop(self, handle: Reply, messages: Sequence[Message]) -> None:
        rid, reply, timing = handle.reply_id, handle.record, handle.timing
        tokens = self._llm.reply(messages)
        asked = list(messages)  # what the LLM is given: the dialogue, then this reply's tool calls and results

        def say(piece: str) -> str:
            reply.text += piece
            self._emit_for(handle, ev.ReplyText(stream_samples=self._vad_pos, wall=now(), reply_id=rid, delta=piece))
            return piece

        async def text() -> AsyncGenerator[str, None]:
            nonlocal tokens
            calls = 0
            while True:
                said, call = "", None
                async for piece in tokens:
                    if handle.cancelled:  # stopped while the TTS's reader was taking text: nothing more of it
                        return
                    if isinstance(piece, ToolCall):
                        call = piece
                        break
                    if calls and not said and reply.text and not reply.text[-1].isspace() \
                            and not piece[:1].isspace():
                        piece = " " + piece  # going on after a tool: a new message, a new word
                    if timing.first_token_wall is None:
                        timing.first_token_wall = now()
                    said += piece
                    yield say(piece)
                if call is None:
                    return
                await _aclose(tokens)
                calls += 1
                if calls > MAX_CALLS_PER_REPLY:
                    self._emit_for(handle, ev.Error(stream_samples=self._vad_pos, wall=now(), stage="tool",
                                                    message=f"the reply called tools {MAX_CALLS_PER_REPLY} times; "
                                                            "it ends here"))
                    return
                await handle.committed.wait()  # a speculative reply never acts: it may yet be withdrawn
                call = ToolCall(f"call_{rid}_{calls}", call.name, call.arguments)
                use = ToolUse(call, text_before=reply.text, started_wall=now())
                reply.tools.append(use)
                self._emit_for(handle, ev.ToolCalled(
                    stream_samples=self._vad_pos, wall=now(), reply_id=rid, call_id=call.call_id, name=call.name,
                    arguments=call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)))
                task = asyncio.ensure_future(run_call(self.tools, call))
                try:
                    done, _ = await asyncio.wait({task}, timeout=self.config.tool_hold_s)
                    if not done and self.config.tool_hold_phrase:
                        yield say((" " if reply.text else "") + self.config.tool_hold_phrase)
                    outcome = await asyncio.shield(task)
                finally:
                    if not task.done() or task.cancelled():
                        self._abandon_tool(handle, use, task)
                use.output, use.error, use.seconds, use.spoken = outcome.output, outcome.error, outcome.seconds, True
                self._emit_for(handle, ev.ToolResult(
                    stream_samples=self._vad_pos, wall=now(), reply_id=rid, call_id=call.call_id, name=call.name,
                    output=outcome.output, error=outcome.error, seconds=outcome.seconds))
                # what it said and the call are one assistant message, as chat templates write a call
                asked.extend([Message("assistant", said.strip(), tool_call=call), Message("tool", outcome.output)])
                tokens = self._llm.reply(asked)

        offset = 0
        pieces = text()
        try:
            async with contextlib.aclosing(self._tts.synthesize(pieces)) as audio:
                async for chunk in audio:
                    if timing.first_chunk_wall is None:
                        timing.first_chunk_wall = now()
                    words = tuple(chunk.words)
                    reply.words.extend(words)
                    self._emit_for(handle, ev.ReplyAudio(stream_samples=self._vad_pos, wall=now(), reply_id=rid,
                                                         offset=offset, samples=len(chunk.pcm), words=words))
                    offset += len(chunk.pcm)
                    if not await self.playout.put(rid, chunk.pcm):
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: reply %d failed", self.name, rid)
            self._emit_for(handle, ev.Error(stream_samples=self._vad_pos, wall=now(), stage="reply",
                                            message=f"{type(exc).__name__}: {exc}"))
        finally:
            await pieces.aclose()
            await _aclose(tokens)
            self.playout.end_reply(rid)

    def _abandon_tool(self, handle: Reply, use: ToolUse, task: asyncio.Future[ToolOutcome]) -> None:
        """The reply stopped while its tool ran: the tool is cancelled, or (``cancel_on_interrupt``
        False) finishes, its result recorded as never spoken."""
        tool = self.tools.get(use.call.name)
        rid, call = handle.reply_id, use.call

        def recorded(outcome: ToolOutcome | None, error: str | None) -> None:
            use.output = outcome.output if outcome is not None else None
            use.error = error if outcome is None else outcome.error
            use.seconds = outcome.seconds if outcome is not None else now() - use.started_wall
            use.spoken = False
            if not self.closed and not handle.speculative:
                self._emit(ev.ToolResult(stream_samples=self._vad_pos, wall=now(), reply_id=rid, call_id=call.call_id,
                                         name=call.name, output=use.output or "", error=use.error,
                                         seconds=use.seconds, spoken=False))

        if tool is None or tool.cancel_on_interrupt or task.done():
            task.cancel()
            recorded(None, "cancelled: the reply was interrupted")
            return

        def finished(done: asyncio.Future[ToolOutcome]) -> None:
            recorded(None if done.cancelled() else done.result(), "cancelled" if done.cancelled() else None)

        self._side_tasks.add(task)  # closing the session cancels it
        task.add_done_callback(self._side_tasks.discard)
        task.add_done_callback(finished)

    async def _playout_loop(self) -> None:
        period = self.playout.frame_samples / self.output_rate
        tick = now()
        while True:
            frame = self.playout.next_frame()
            for sub in self._audio_subs:
                sub._put(frame.pcm)
            if self.recording is not None:
                self.recording.agent(frame, self._stream_now())
            self._on_frame(frame)
            tick += period
            delay = tick - now()
            if delay < -1.0:  # the loop was stalled for a long time: do not burst to catch up
                tick = now()
            await asyncio.sleep(max(0.0, delay))

    def _stream_now(self) -> float:
        """Where the input stream stands now, in its samples: what was received, plus the time since
        its last block arrived (at most MAX_EXTRAPOLATION_S: a paused source stops the clock)."""
        if not self._arrival_walls:
            return 0.0
        since = min(max(0.0, now() - self._arrival_walls[-1]), MAX_EXTRAPOLATION_S)
        return self._pushed + since * INPUT_RATE

    def _take_back_unheard(self) -> None:
        """The frames a live output has not played yet (unread in its queue, or held by the output
        itself: ``take_back``) are not heard: they go, and back to the playout, which fades out from
        the last frame that did play. With several live outputs, the one nearest to its ear sets
        how far back (the others skip what they held beyond it, under the fade)."""
        unheard = []
        for sub in self._live_subs:
            queued = sub.queued()
            sub.drop_newest(queued)
            unheard.append(queued + (sub.take_back() if sub.take_back is not None else 0))
        back = min(unheard, default=0)
        if not back:
            return
        self.playout.rewind(back)
        if self.recording is not None:
            self.recording.unplay(back)
        if self._reply is not None and not self._reply.done:
            self._reply.played = min(self._reply.played, self.playout.played)

    def _on_frame(self, frame: Frame) -> None:
        self._frames += 1
        if self._pause_start is not None and self.playout.paused:
            self._emit(ev.Metric(stream_samples=self._vad_pos, wall=now(), name="barge_in_s",
                                 value=now() - self.arrival(self._pause_start),
                                 reply_id=self._reply.reply_id if self._reply else None))
            self._pause_start = None
        reply = self._reply
        if reply is None or reply.done:
            return
        if frame.reply_id == reply.reply_id:
            reply.played = frame.played
            if reply.first_audio_wall is None:
                self._first_audio(reply)
            elif self._frames % PROGRESS_EVERY == 0:
                self._emit(ev.PlaybackProgress(stream_samples=self._vad_pos, wall=now(),
                                               reply_id=reply.reply_id, played=reply.played))
        if frame.finished:
            if reply.played:
                self._emit(ev.PlaybackProgress(stream_samples=self._vad_pos, wall=now(),
                                               reply_id=reply.reply_id, played=reply.played))
            self._finish_reply(interrupted=False)
            self.policy.reply_finished()
            self._set_state("listening")

    def _first_audio(self, reply: AgentTurn) -> None:
        wall = now()
        reply.first_audio_wall = wall
        self.policy.reply_audible()
        self._emit(ev.AudioOut(stream_samples=self._vad_pos, wall=wall, reply_id=reply.reply_id))
        self._set_state("speaking")
        if self._current is None or self._current.record is not reply:
            return
        parts = self._current.timing.breakdown(wall)
        parts["voice_to_voice_s"] += self.output_latency_s
        if self.output_latency_s:
            parts["output_s"] = self.output_latency_s
        for name, value in parts.items():
            if math.isfinite(value):
                self._emit(ev.Metric(stream_samples=self._vad_pos, wall=wall, name=name, value=round(value, 4),
                                     reply_id=reply.reply_id))
