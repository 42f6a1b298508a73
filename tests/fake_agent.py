"""Helpers for orchestration tests: an Agent on the fake stages with the real VAD, inputs cut from
real speech, and :func:`drive`, which feeds a session through :mod:`duplex.scenario`."""

from __future__ import annotations

import numpy as np

from duplex.agent import Agent
from duplex.config import AgentConfig, TurnConfig
from duplex.fakes import FakeASR, FakeLLM, FakeTTS
from duplex.scenario import Say, ScenarioRun, run_scenario
from duplex.stages import Stages

RATE = 16_000


def make_agent(vad_model, *, asr: dict | None = None, llm: dict | None = None, tts: dict | None = None,
               turn: TurnConfig | None = None, tools=()) -> Agent:
    config = AgentConfig(profile="fake", turn=turn or TurnConfig())
    stages = Stages(vad=vad_model, asr=FakeASR(**(asr or {})), llm=FakeLLM(**(llm or {})),
                    tts=FakeTTS(**(tts or {})))
    return Agent(stages, config, tools=tools)


def clip(jfk16: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    return jfk16[int(start_s * RATE):int(end_s * RATE)]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


async def drive(agent: Agent, pcm: np.ndarray, *, rate: int = RATE, session=None) -> ScenarioRun:
    """Feed ``pcm`` to a session (a new one of ``agent`` unless given) in live-paced packets, then close."""
    return await run_scenario(session or agent.session(), [Say(pcm, rate)])
