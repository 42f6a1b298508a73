"""Scripted conversations: feed a session like a live microphone and record what comes back.

A scenario is a list of steps: :class:`Say` (user audio), :class:`Silence`, :class:`WaitSpeaking`
(until the agent's voice is heard: used to barge in mid-reply) and :class:`WaitDone` (until the agent
has finished). :func:`run_scenario` pushes one 20 ms packet every 20 ms on the loop clock (silence
between steps, as a microphone never stops), so it works on the wall clock and on the virtual clock
alike. It is the one driver behind ``duplex simulate``, ``duplex bench e2e``, the endurance run and
the orchestration tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from duplex import events as ev
from duplex.clock import now
from duplex.session import Session

PACKET_S = 0.02


@dataclass
class Say:
    pcm: np.ndarray  # [T] float32 (or anything push_audio takes)
    rate: int = 16_000
    label: str = ""


@dataclass
class Silence:
    seconds: float


@dataclass
class WaitSpeaking:
    """Silence until the agent's voice is heard (at most ``timeout_s``)."""

    timeout_s: float = 30.0


@dataclass
class WaitDone:
    """Silence until the agent is listening again with nothing left to play (at most ``timeout_s``)."""

    timeout_s: float = 60.0


Step = Say | Silence | WaitSpeaking | WaitDone


@dataclass
class ScenarioRun:
    events: list[ev.Event] = field(default_factory=list)
    metrics: list[ev.Metric] = field(default_factory=list)  # kept even when events are not
    frames: list[np.ndarray] = field(default_factory=list)  # every output frame, time-aligned from t0
    frame_walls: list[float] = field(default_factory=list)
    t0: float = 0.0
    pushed_s: float = 0.0  # seconds of user audio (speech and silence) pushed
    timeouts: list[str] = field(default_factory=list)
    conversation: dict = field(default_factory=dict)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def audio(self) -> np.ndarray:
        return np.concatenate(self.frames) if self.frames else np.zeros(0, np.float32)

    def turn_metrics(self) -> list[dict[str, float]]:
        """Per reply, the latency breakdown the session measured."""
        rows: dict[int, dict[str, float]] = {}
        for m in self.metrics:
            if m.reply_id is not None and m.name != "barge_in_s":
                rows.setdefault(m.reply_id, {"reply_id": m.reply_id})[m.name] = m.value
        return [rows[k] for k in sorted(rows)]

    def barge_ins(self) -> list[float]:
        return [m.value for m in self.metrics if m.name == "barge_in_s"]


async def run_scenario(session: Session, steps: Sequence[Step], *, keep_events: bool = True,
                       keep_audio: bool = True,
                       on_event: Callable[[ev.Event], None] | None = None,
                       on_step: Callable[[Step, float], None] | None = None) -> ScenarioRun:
    """Drive ``session`` through ``steps`` in live-paced 20 ms packets; close it at the end.

    ``keep_events``/``keep_audio`` False keep memory flat on long runs (``on_event`` still sees all);
    ``on_step(step, start_s)`` hears each step begin, at its input second (benchmarks: ground truth)."""
    run = ScenarioRun(t0=session.t0)
    events, frames = session.events(maxsize=1_000_000), session.audio(maxsize=1_000_000)

    async def collect_events() -> None:
        async for e in events:
            if keep_events:
                run.events.append(e)
            if isinstance(e, ev.Metric):
                run.metrics.append(e)
            if on_event is not None:
                on_event(e)

    async def collect_frames() -> None:
        async for f in frames:
            if keep_audio:
                run.frames.append(f)
                run.frame_walls.append(now())

    tasks = [asyncio.create_task(collect_events()), asyncio.create_task(collect_frames())]
    clock = session.t0  # when the next packet is complete, as from a microphone

    async def push(pcm: np.ndarray, rate: int) -> bool:
        nonlocal clock
        packet = int(round(PACKET_S * rate))
        for start in range(0, len(pcm), packet):
            piece = pcm[start:start + packet]
            clock += len(piece) / rate
            await asyncio.sleep(max(0.0, clock - now()))
            if session.closed:  # a stage failed and ended the session
                return False
            session.push_audio(piece, rate)
            run.pushed_s += len(piece) / rate
        return True

    silence = np.zeros(int(PACKET_S * 16_000), np.float32)

    async def wait(done: Callable[[], bool], timeout_s: float, what: str) -> bool:
        deadline = now() + timeout_s
        while not done():
            if now() > deadline:
                run.timeouts.append(what)
                break
            if not await push(silence, 16_000):
                return False
        return True

    def speaking() -> bool:
        return session.state == "speaking"

    def done() -> bool:
        return session.state == "listening" and session.playout.active is None and not session.policy.user_text

    try:
        for step in steps:
            if on_step is not None:
                on_step(step, run.pushed_s)
            if isinstance(step, Say):
                ok = await push(np.asarray(step.pcm), step.rate)
            elif isinstance(step, Silence):
                ok = await push(np.zeros(int(step.seconds * 16_000), np.float32), 16_000)
            elif isinstance(step, WaitSpeaking):
                ok = await wait(speaking, step.timeout_s, "agent speaking")
            else:
                ok = await wait(done, step.timeout_s, "agent done")
            if not ok:
                break
        await asyncio.sleep(PACKET_S)
    finally:
        await session.close()
    await asyncio.gather(*tasks)
    run.conversation = session.conversation.to_json()
    return run
