"""The Agent: loads the models once and opens sessions that share them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from duplex.config import AgentConfig, load_config
from duplex.tools import Tool, load_tools, tool_table
from duplex.profiles import build_stages
from duplex.session import Session
from duplex.stages import Stages

if TYPE_CHECKING:
    from duplex.conversation import Conversation
    from duplex.core.remote import Core

log = logging.getLogger(__name__)

async def warm_up(stages: Stages, progress: Callable[[str], None] | None = None) -> None:
    """Let every stage that has one run its warm-up (CUDA graph capture: a line per captured batch
    size to ``progress``, default stderr) before the first session needs it."""
    report = progress or (lambda line: print(f"duplex: {line}", file=sys.stderr, flush=True))
    for role in ("vad", "asr", "llm", "tts"):
        model = getattr(stages, role)
        warm = getattr(model, "warm_up", None)
        if warm is not None:
            t0 = time.perf_counter()
            await warm(report)
            log.info("%s warm-up took %.1f s", role, time.perf_counter() - t0)


class Agent:
    """Models loaded once (per ``config.profile``), shared by every :class:`Session` it opens.

    >>> agent = await Agent.load(profile="tiny")     # doctest: +SKIP
    >>> async with agent.session() as session: ...    # doctest: +SKIP
    """

    def __init__(self, stages: Stages, config: AgentConfig, core: Core | None = None, *,
                 tools: Sequence[Tool] = ()) -> None:
        self.stages = stages
        # what its replies may call (duplex.tools): config.tools, then tools
        self.tools: dict[str, Tool] = tool_table([*load_tools(config.tools), *tools])
        if self.tools and not getattr(stages.llm, "calls_tools", False):
            log.warning("%d tools are registered, but this LLM (%s) does not call tools yet: replies never use "
                        "them (the fake profile's scripted LLM does)", len(self.tools), type(stages.llm).__name__)
        self.config = config
        self.core = core  # the engine core process serving the stages (engine_core "process"), if any
        self._count = itertools.count(1)
        self.sessions: set[Session] = set()

    @classmethod
    async def load(cls, config: AgentConfig | str | os.PathLike | None = None, *, tools: Sequence[Tool] = (),
                   **overrides: Any) -> Agent:
        """Build the profile's models on a thread (loading can take a while) and return the agent.

        ``config`` is an :class:`~duplex.config.AgentConfig` or the path of a TOML file of its fields
        (:func:`~duplex.config.load_config`); ``tools``: what replies may call (:mod:`duplex.tools`);
        ``overrides`` set fields, e.g. ``profile="tiny"``."""
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        config = config or AgentConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown agent option {key!r}")
            setattr(config, key, value)
        config.validate()
        if config.engine_core == "process":  # the models load, warm up and run in the core process
            from duplex.core.remote import Core

            core = await Core.start(config)
            return cls(core.stages(), config, core, tools=tools)
        stages = await asyncio.to_thread(build_stages, config)
        await warm_up(stages)
        return cls(stages, config, tools=tools)

    @property
    def output_rate(self) -> int:
        return self.stages.tts.sample_rate

    def session(self, *, record: str | os.PathLike | None = None, resume: Conversation | None = None) -> Session:
        """Open a session (call inside the running event loop; close it with ``await s.close()`` or
        ``async with``). ``record``: a folder to write its recording to when it closes (a stereo WAV
        of both sides, the transcript heard, the events: :mod:`duplex.recording`). ``resume``: the
        conversation of an earlier session (``session.conversation``) to continue: its record goes on,
        and the LLM's context is rebuilt from it."""
        session = Session(self.stages, self.config, name=f"session-{next(self._count)}",
                          on_close=self.sessions.discard, record=record, resume=resume,
                          tools=self.tools)
        self.sessions.add(session)
        return session

    async def aclose(self) -> None:
        """Close every open session, then the models' workers (or the engine core process)."""
        await asyncio.gather(*(s.close() for s in list(self.sessions)), return_exceptions=True)
        if self.core is not None:
            await self.core.aclose()
            return
        for model in (self.stages.vad, self.stages.asr, self.stages.llm, self.stages.tts):
            close = getattr(model, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
