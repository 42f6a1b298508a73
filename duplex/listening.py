"""A session's listening side: the VAD, the streaming ASR and the LLM's listens, feeding the turn policy.

:class:`Listening` owns the three tasks that turn the user's audio into the policy's inputs: the
VAD task (speech edges, and peeks while the agent speaks so a barge-in acts on the first voiced
window), the ASR task (partials and finals, an endpoint where the VAD heard the end of speech) and
the LLM's listen task, which prefills the user's words as they come (coalesced: one call in flight,
the latest words next) and turns its end-of-turn estimate into a policy input. It also asks the LLM
whether words said over the agent are a backchannel. Its position (the input samples the VAD has
read) stamps the session's events.

It acts on the :class:`~duplex.session.Session` that holds it (the policy's actions go back through
it); the session owns the policy, the record and the LLM stream, the :class:`~duplex.intake.Intake`
the queues it reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from duplex import events as ev
from duplex.clock import now
from duplex.intake import ENDPOINT
from duplex.stages import ASRStream, VADStream
from duplex.turns import Phase

if TYPE_CHECKING:
    from duplex.session import Session

log = logging.getLogger(__name__)


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not merely an awaited call that was).
    Python 3.10 cannot tell: there any cancellation counts as the task's own."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _take_all(first: object, queue: asyncio.Queue[object], held: list[object] | None = None) -> np.ndarray:
    """``first`` and every block queued behind it, as one block (a stream that fell behind catches
    up in one call, not a call per 20 ms); a marker ends the run and goes to ``held``."""
    assert isinstance(first, np.ndarray)
    blocks = [first]
    while not queue.empty():
        item = queue.get_nowait()
        if not isinstance(item, np.ndarray):
            assert held is not None, "a marker in a queue of blocks only"
            held.append(item)
            break
        blocks.append(item)
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class Listening:
    """The VAD, ASR and listen tasks of one session (see the module's docstring)."""

    def __init__(self, session: Session, vad: VADStream, asr: ASRStream) -> None:
        self.session = session
        self.vad = vad
        self.asr = asr
        self.position = 0  # input samples the VAD has read: the stream time events are stamped with
        self.turn_start = 0  # where the user's turn began
        self.last_final_wall = session.t0
        # What each ASR partial costs the event loop (the events, the policy, the record's messages
        # for the LLM), in CPU seconds of this thread: the long-dialogue benchmark watches it stay flat.
        self.partials = 0
        self.partial_cpu_s = 0.0
        self.listen_task: asyncio.Task[None] | None = None
        self._listen_wanted = False

    async def vad_loop(self) -> None:
        s = self.session
        queue = s.intake.queues["vad"]
        while True:
            block = _take_all(await queue.get(), queue)
            # while the agent speaks, the VAD also looks at audio short of a whole window: the user's
            # voice pauses the agent up to a window sooner
            found = await self.vad.feed(block, peek=s.policy.phase is Phase.SPEAKING)
            self.position += block.size
            s.intake.consumed("vad", block.size)
            for event in found:
                s._emit(event)
                if isinstance(event, ev.VoiceEdge):
                    s._apply(s.policy.voice_edge(event.at, event.voiced))
                elif isinstance(event, ev.SpeechStarted):
                    if not s.policy.user_text:
                        self.turn_start = event.start
                    s._apply(s.policy.speech_started(event.start))
                else:
                    s.intake.queues["asr"].put_nowait(ENDPOINT)
                    s._apply(s.policy.speech_stopped(event.end))
            s._apply(s.policy.advance(self.position))

    async def asr_loop(self) -> None:
        s = self.session
        queue = s.intake.queues["asr"]
        held: list[object] = []  # an endpoint marker met while taking the blocks before it
        while True:
            item = held.pop() if held else await queue.get()
            if item is not ENDPOINT:
                item = _take_all(item, queue, held)
            finals: Sequence[ev.TranscriptPartial | ev.TranscriptFinal]
            if item is ENDPOINT:
                finals = await self.asr.endpoint()
                self.last_final_wall = now()
                if not finals:
                    s._apply(s.policy.final(""))
            else:
                assert isinstance(item, np.ndarray)
                finals = await self.asr.feed(item)  # partials and model-detected finals
                s.intake.consumed("asr", item.size)
            for event in finals:
                cpu = time.thread_time()
                s._emit(event)
                if isinstance(event, ev.TranscriptFinal):
                    self.last_final_wall = event.wall
                    s._apply(s.policy.final(event.text, event.eou))
                else:
                    s._apply(s.policy.transcript(event.text))
                    self.partials += 1
                self.want_listen()
                self.partial_cpu_s += time.thread_time() - cpu

    def want_listen(self) -> None:
        """Let the LLM prefill the user's words as they come (coalesced: one call in flight)."""
        s = self.session
        if s.policy.phase is not Phase.LISTENING or not s.policy.user_text:
            return
        self._listen_wanted = True
        if self.listen_task is None or self.listen_task.done():
            self.listen_task = asyncio.create_task(s._guard_soft("llm", self._listen_loop))

    async def _listen_loop(self) -> None:
        s = self.session
        while self._listen_wanted and s.policy.phase is Phase.LISTENING:
            self._listen_wanted = False
            text = s.policy.user_text
            cpu = time.thread_time()
            messages = s.conversation.messages(text)
            self.partial_cpu_s += time.thread_time() - cpu
            p = await s._llm.listen(messages)
            if p is not None:
                s._emit(ev.EndOfTurnEstimate(stream_samples=self.position, wall=now(), probability=p))
                s._apply(s.policy.eot_estimate(p, text))

    async def check(self, text: str) -> None:
        """Ask whether ``text`` (said over the agent) is a backchannel; a failed check, one cancelled
        under it (the engine or the core dropped the call), or one not answered within
        ``turn.check_timeout_s`` is a verdict too (None: yield), so the pause never waits on it for
        long. Only this task being cancelled (the session closing) ends it without a verdict."""
        s = self.session
        backchannel: bool | None = False
        turn = s.config.turn
        if turn.backchannels:
            try:
                backchannel = await asyncio.wait_for(s._llm.is_backchannel(s.conversation.messages(), text),
                                                     turn.check_timeout_s)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and _cancelling():
                    raise
                why = (f"no answer within {turn.check_timeout_s} s (turn.check_timeout_s)"
                       if isinstance(exc, asyncio.TimeoutError) else
                       "the call was cancelled" if isinstance(exc, asyncio.CancelledError) else
                       f"{type(exc).__name__}: {exc}")
                log.warning("%s: the backchannel check failed (%s); yielding", s.name, why)
                s._emit(ev.Error(stream_samples=self.position, wall=now(), stage="llm",
                                 message=f"backchannel check failed: {why}"))
                backchannel = None
        s._apply(s.policy.barge_in_verdict(backchannel, text))
