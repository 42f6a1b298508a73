"""A session's speaking side: its replies from the first token to the last frame heard.

:class:`Speaking` owns what the agent says: the replies (the committed one, playing or about to,
and a speculative one the policy may yet commit or withdraw), each a :class:`~duplex.reply.Reply`
handle stopped by one call; the reply task (LLM tokens, tool calls, TTS audio into the playout); the
playout and the 20 ms task that hands its frames to the audio subscriptions; the pause and resume
of a barge-in, with the frames a live output had not played yet taken back; and what the record
keeps of each reply (the samples played, hence the words heard).

It acts on the :class:`~duplex.session.Session` that holds it (the policy's actions arrive through
it, and events leave through it); the session owns the record, the policy and the LLM stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from duplex import events as ev
from duplex.clock import now
from duplex.conversation import AgentTurn, ToolUse
from duplex.events import Event
from duplex.playout import Frame, Playout
from duplex.reply import Reply, TurnTiming
from duplex.stages import Message, TTSStream
from duplex.subscription import Subscription
from duplex.tools import MAX_CALLS_PER_REPLY, ToolCall, ToolOutcome, run_call
from duplex.turns import EndTurn

if TYPE_CHECKING:
    from duplex.session import Session

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10  # frames between PlaybackProgress events (200 ms)


async def _aclose(iterator: object) -> None:
    """Close an async iterator that can be closed (the LLM's token streams are async generators)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class Speaking:
    """The replies of one session and the audio they make (see the module's docstring)."""

    def __init__(self, session: Session, tts: TTSStream, output_rate: int, first_reply_id: int) -> None:
        self.session = session
        self.tts = tts
        self.output_rate = output_rate
        self.playout = Playout(output_rate)
        self.audio_subs: list[Subscription[np.ndarray]] = []
        self.live_subs: list[Subscription[np.ndarray]] = []  # speakers and wires (see Session.audio)
        self._reply_id = first_reply_id  # the last id handed out
        self.current: Reply | None = None  # the committed reply (playing, or about to)
        self.spec: Reply | None = None  # a speculative reply, made while the policy decides
        self.speculations = {"started": 0, "committed": 0, "withdrawn": 0}
        self.tasks: set[asyncio.Task[None]] = set()  # every reply's, until it has ended
        self._pause_start: int | None = None  # speech onset of a barge-in not yet silenced
        self._frames = 0

    @property
    def record(self) -> AgentTurn | None:
        """The record of the committed reply."""
        return self.current.record if self.current is not None else None

    def subscribe(self, maxsize: int, live: bool) -> Subscription[np.ndarray]:
        sub: Subscription[np.ndarray] = Subscription(maxsize)
        self.audio_subs.append(sub)
        if live:
            self.live_subs.append(sub)
        return sub

    def close(self) -> None:
        """The session closes: a speculative reply vanishes, the committed one ends as interrupted
        where it was heard to (the tasks are the session's to cancel and await)."""
        self.withdraw()
        if self.record is not None and not self.record.done:
            self.finish(interrupted=True)

    # -- the policy's actions ----------------------------------------------------------------------

    def pause(self, speech_start: int) -> None:
        """The user's voice over the agent: silent from the next frame, the unheard frames taken back."""
        s = self.session
        self.playout.pause()
        self._take_back_unheard()
        self._pause_start = speech_start
        if self.record is not None:
            s._emit(ev.BargeIn(stream_samples=s.position, wall=now(), reply_id=self.record.reply_id,
                               speech_start=speech_start))
        s._set_state("listening")

    def resume(self) -> None:
        s = self.session
        self.playout.resume()
        self._pause_start = None
        if self.record is not None:
            s._emit(ev.Resumed(stream_samples=s.position, wall=now(), reply_id=self.record.reply_id))
            s._set_state("speaking")

    def speculate(self, text: str) -> None:
        """The user's speech stopped: make the reply to ``text`` now, holding it back."""
        s = self.session
        self.withdraw()
        if self.current is not None and not self.current.record.done:
            return  # a committed reply still owns the output (the policy would not ask for this)
        self.spec = self._new_reply(text, speculative=True)
        self.speculations["started"] += 1
        s._emit(ev.Metric(stream_samples=s.position, wall=now(), name="speculation_started", value=1.0))

    def withdraw(self) -> None:
        """The speculative reply vanishes: its generation stops, its audio is dropped, and nothing
        of it was emitted or recorded."""
        spec, self.spec = self.spec, None
        if spec is None:
            return
        spec.stop()
        self.speculations["withdrawn"] += 1
        s = self.session
        s._emit(ev.Metric(stream_samples=s.position, wall=now(), name="speculation_withdrawn", value=1.0))

    def end_turn(self, action: EndTurn) -> None:
        """The user's turn ended: the reply to it is committed (the speculative one, if it answers
        these words) and enters the record."""
        s = self.session
        wall = now()
        turn = s.conversation.user_turn_ended(action.text, s.listening.turn_start, action.speech_end, wall)
        s._emit(ev.TurnEnded(stream_samples=s.position, wall=wall, turn=turn.index, text=action.text,
                             speech_end=action.speech_end))
        spec = self.spec
        if spec is not None and spec.answers == action.text:  # the reply is already being made: commit it
            self.spec = None
            reply = spec
            held = reply.commit()
            self.speculations["committed"] += 1
        else:
            self.withdraw()
            reply, held = self._new_reply(action.text, speculative=False), []
        reply.record.turn, reply.record.started_wall = turn.index, wall
        reply.timing.speech_end_wall = s.intake.arrival(action.speech_end)
        reply.timing.final_wall, reply.timing.turn_end_wall = s.listening.last_final_wall, wall
        s.conversation.add_reply(reply.record)
        self.current = reply
        s._emit(ev.ReplyStarted(stream_samples=s.position, wall=wall, reply_id=reply.reply_id, turn=turn.index))
        for event in held:
            s._emit(event)
        s._set_state("thinking")

    def stop(self, heard: bool) -> None:
        """Barge-in confirmed (``heard``: the record keeps what was heard) or the user went on before
        any audio (not heard: the reply leaves the record)."""
        s = self.session
        if self.current is not None:
            self.current.stop()
        else:
            self.playout.drop()  # nothing plays: only a pause is undone
        self._pause_start = None
        record = self.record
        if record is None or record.done:
            return
        if heard:
            self.finish(interrupted=True)
        else:
            s.conversation.reply_cancelled_unheard(record.reply_id)
            s._emit(ev.ReplyDone(stream_samples=s.position, wall=now(), reply_id=record.reply_id,
                                 text=record.text, heard="", interrupted=True))
            self.current = None
        s._set_state("listening")

    def finish(self, interrupted: bool) -> None:
        """The committed reply ends (played out, or cut where it was heard to)."""
        s = self.session
        record = self.record
        assert record is not None
        s.conversation.reply_closed(record.reply_id, interrupted)
        wall = now()
        if interrupted:
            s._emit(ev.Interrupted(stream_samples=s.position, wall=wall, reply_id=record.reply_id,
                                   heard=record.heard, played=record.played))
        s._emit(ev.ReplyDone(stream_samples=s.position, wall=wall, reply_id=record.reply_id,
                             text=record.text, heard=record.heard, interrupted=interrupted))
        self.current = None

    # -- making a reply ----------------------------------------------------------------------------

    def _new_reply(self, text: str, *, speculative: bool) -> Reply:
        """Start generating a reply to ``text`` (speculative: held back, out of the record)."""
        s = self.session
        self._reply_id += 1
        rid, wall = self._reply_id, now()
        record = AgentTurn(reply_id=rid, turn=-1, sample_rate=self.output_rate, started_wall=wall)
        end = s.policy.speech_end if s.policy.speech_end is not None else s.position
        timing = TurnTiming(speech_end_wall=s.intake.arrival(end), final_wall=s.listening.last_final_wall,
                            turn_end_wall=wall)
        reply = Reply(rid, text, record, timing, speculative, self.playout)
        messages = s.conversation.messages(text) if speculative else s.conversation.messages()
        reply.task = asyncio.create_task(self._reply_loop(reply, messages), name=f"{s.name}-reply-{rid}")
        self.tasks.add(reply.task)
        reply.task.add_done_callback(self.tasks.discard)
        return reply

    def _emit_for(self, reply: Reply, event: Event) -> None:
        """An event of ``reply``: held back while it is speculative."""
        if reply.speculative:
            reply.held.append(event)
        else:
            self.session._emit(event)

    async def _reply_loop(self, handle: Reply, messages: Sequence[Message]) -> None:
        s = self.session
        rid, reply, timing = handle.reply_id, handle.record, handle.timing
        tokens = s._llm.reply(messages)
        asked = list(messages)  # what the LLM is given: the dialogue, then this reply's tool calls and results

        def say(piece: str) -> str:
            reply.text += piece
            self._emit_for(handle, ev.ReplyText(stream_samples=s.position, wall=now(), reply_id=rid, delta=piece))
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
                    self._emit_for(handle, ev.Error(stream_samples=s.position, wall=now(), stage="tool",
                                                    message=f"the reply called tools {MAX_CALLS_PER_REPLY} times; "
                                                            "it ends here"))
                    return
                await handle.committed.wait()  # a speculative reply never acts: it may yet be withdrawn
                call = ToolCall(f"call_{rid}_{calls}", call.name, call.arguments)
                use = ToolUse(call, text_before=reply.text, started_wall=now())
                reply.tools.append(use)
                self._emit_for(handle, ev.ToolCalled(
                    stream_samples=s.position, wall=now(), reply_id=rid, call_id=call.call_id, name=call.name,
                    arguments=call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)))
                task = asyncio.ensure_future(run_call(s.tools, call))
                try:
                    done, _ = await asyncio.wait({task}, timeout=s.config.tool_hold_s)
                    if not done and s.config.tool_hold_phrase:
                        yield say((" " if reply.text else "") + s.config.tool_hold_phrase)
                    outcome = await asyncio.shield(task)
                finally:
                    if not task.done() or task.cancelled():
                        self._abandon_tool(handle, use, task)
                use.output, use.error, use.seconds, use.spoken = outcome.output, outcome.error, outcome.seconds, True
                self._emit_for(handle, ev.ToolResult(
                    stream_samples=s.position, wall=now(), reply_id=rid, call_id=call.call_id, name=call.name,
                    output=outcome.output, error=outcome.error, seconds=outcome.seconds))
                # what it said and the call are one assistant message, as chat templates write a call
                asked.extend([Message("assistant", said.strip(), tool_call=call), Message("tool", outcome.output)])
                tokens = s._llm.reply(asked)

        offset = 0
        pieces = text()
        try:
            async with contextlib.aclosing(self.tts.synthesize(pieces)) as audio:
                async for chunk in audio:
                    if timing.first_chunk_wall is None:
                        timing.first_chunk_wall = now()
                    words = tuple(chunk.words)
                    reply.words.extend(words)
                    self._emit_for(handle, ev.ReplyAudio(stream_samples=s.position, wall=now(), reply_id=rid,
                                                         offset=offset, samples=len(chunk.pcm), words=words))
                    offset += len(chunk.pcm)
                    if not await self.playout.put(rid, chunk.pcm):
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: reply %d failed", s.name, rid)
            self._emit_for(handle, ev.Error(stream_samples=s.position, wall=now(), stage="reply",
                                            message=f"{type(exc).__name__}: {exc}"))
        finally:
            await pieces.aclose()
            await _aclose(tokens)
            self.playout.end_reply(rid)

    def _abandon_tool(self, handle: Reply, use: ToolUse, task: asyncio.Future[ToolOutcome]) -> None:
        """The reply stopped while its tool ran: the tool is cancelled, or (``cancel_on_interrupt``
        False) finishes, its result recorded as never spoken."""
        s = self.session
        tool = s.tools.get(use.call.name)
        rid, call = handle.reply_id, use.call

        def recorded(outcome: ToolOutcome | None, error: str | None) -> None:
            use.output = outcome.output if outcome is not None else None
            use.error = error if outcome is None else outcome.error
            use.seconds = outcome.seconds if outcome is not None else now() - use.started_wall
            use.spoken = False
            if not s.closed and not handle.speculative:
                s._emit(ev.ToolResult(stream_samples=s.position, wall=now(), reply_id=rid, call_id=call.call_id,
                                      name=call.name, output=use.output or "", error=use.error,
                                      seconds=use.seconds, spoken=False))

        if tool is None or tool.cancel_on_interrupt or task.done():
            task.cancel()
            recorded(None, "cancelled: the reply was interrupted")
            return

        def finished(done: asyncio.Future[ToolOutcome]) -> None:
            recorded(None if done.cancelled() else done.result(), "cancelled" if done.cancelled() else None)

        s._spawn(task)  # closing the session cancels it
        task.add_done_callback(finished)

    # -- the 20 ms output --------------------------------------------------------------------------

    async def playout_loop(self) -> None:
        s = self.session
        period = self.playout.frame_samples / self.output_rate
        tick = now()
        while True:
            frame = self.playout.next_frame()
            for sub in self.audio_subs:
                sub.publish(frame.pcm)
            if s.recording is not None:
                s.recording.agent(frame, s.intake.stream_now())
            self._on_frame(frame)
            tick += period
            delay = tick - now()
            if delay < -1.0:  # the loop was stalled for a long time: do not burst to catch up
                tick = now()
            await asyncio.sleep(max(0.0, delay))

    def _take_back_unheard(self) -> None:
        """The frames a live output has not played yet (unread in its queue, or held by the output
        itself: ``take_back``) are not heard: they go, and back to the playout, which fades out from
        the last frame that did play. With several live outputs, the one nearest to its ear sets
        how far back (the others skip what they held beyond it, under the fade)."""
        unheard = []
        for sub in self.live_subs:
            queued = sub.queued()
            sub.drop_newest(queued)
            unheard.append(queued + (sub.take_back() if sub.take_back is not None else 0))
        back = min(unheard, default=0)
        if not back:
            return
        self.playout.rewind(back)
        if self.session.recording is not None:
            self.session.recording.unplay(back)
        if self.record is not None and not self.record.done:
            self.record.played = min(self.record.played, self.playout.played)

    def _on_frame(self, frame: Frame) -> None:
        s = self.session
        self._frames += 1
        if self._pause_start is not None and self.playout.paused:
            s._emit(ev.Metric(stream_samples=s.position, wall=now(), name="barge_in_s",
                              value=now() - s.intake.arrival(self._pause_start),
                              reply_id=self.record.reply_id if self.record else None))
            self._pause_start = None
        record = self.record
        if record is None or record.done:
            return
        if frame.reply_id == record.reply_id:
            record.played = frame.played
            if record.first_audio_wall is None:
                self._first_audio(record)
            elif self._frames % PROGRESS_EVERY == 0:
                s._emit(ev.PlaybackProgress(stream_samples=s.position, wall=now(),
                                            reply_id=record.reply_id, played=record.played))
        if frame.finished:
            if record.played:
                s._emit(ev.PlaybackProgress(stream_samples=s.position, wall=now(),
                                            reply_id=record.reply_id, played=record.played))
            self.finish(interrupted=False)
            s.policy.reply_finished()
            s._set_state("listening")

    def _first_audio(self, record: AgentTurn) -> None:
        s = self.session
        wall = now()
        record.first_audio_wall = wall
        s.policy.reply_audible()
        s._emit(ev.AudioOut(stream_samples=s.position, wall=wall, reply_id=record.reply_id))
        s._set_state("speaking")
        if self.current is None or self.current.record is not record:
            return
        parts = self.current.timing.breakdown(wall)
        parts["voice_to_voice_s"] += s.output_latency_s
        if s.output_latency_s:
            parts["output_s"] = s.output_latency_s
        for name, value in parts.items():
            if math.isfinite(value):
                s._emit(ev.Metric(stream_samples=s.position, wall=wall, name=name, value=round(value, 4),
                                  reply_id=record.reply_id))
