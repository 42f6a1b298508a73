"""Helpers for orchestration tests: an Agent on the fake stages with the real VAD, inputs cut from
real speech, and a runner that feeds a session on the virtual clock and collects what comes out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from duplex import events as ev
from duplex.agent import Agent
from duplex.clock import now
from duplex.config import AgentConfig, TurnConfig
from duplex.fakes import FakeASR, FakeLLM, FakeTTS
from duplex.stages import Stages

RATE = 16_000


def make_agent(vad_model, *, asr: dict | None = None, llm: dict | None = None, tts: dict | None = None,
               turn: TurnConfig | None = None) -> Agent:
    config = AgentConfig(profile="fake", turn=turn or TurnConfig())
    stages = Stages(vad=vad_model, asr=FakeASR(**(asr or {})), llm=FakeLLM(**(llm or {})),
                    tts=FakeTTS(**(tts or {})))
    return Agent(stages, config)


def clip(jfk16: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    return jfk16[int(start_s * RATE):int(end_s * RATE)]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


@dataclass
class Run:
    events: list[ev.Event] = field(default_factory=list)
    frames: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (wall, pcm) per output frame
    conversation: dict = field(default_factory=dict)
    t0: float = 0.0

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def audio(self) -> np.ndarray:
        return np.concatenate([f for _, f in self.frames]) if self.frames else np.zeros(0, np.float32)


async def drive(agent: Agent, pcm: np.ndarray, *, rate: int = RATE, packet_s: float = 0.02,
                session=None, until=None) -> Run:
    """Feed ``pcm`` in live-paced packets, then close; ``until(run)`` may end the feed early."""
    session = session or agent.session()
    run = Run(t0=session.t0)
    events, frames = session.events(maxsize=1_000_000), session.audio(maxsize=1_000_000)

    async def collect_events() -> None:
        async for e in events:
            run.events.append(e)

    async def collect_frames() -> None:
        async for f in frames:
            run.frames.append((now(), f))

    tasks = [asyncio.create_task(collect_events()), asyncio.create_task(collect_frames())]
    packet = int(packet_s * rate)
    for k, start in enumerate(range(0, len(pcm), packet)):
        await asyncio.sleep(max(0.0, session.t0 + (start + packet) / rate - now()))
        if session.closed:  # a stage failed and ended the session
            break
        session.push_audio(pcm[start:start + packet], rate)
        if until is not None and until(run):
            break
    await asyncio.sleep(0.02)
    await session.close()
    await asyncio.gather(*tasks)
    run.conversation = session.conversation.to_json()
    return run
