"""duplex: a full-duplex speech agent (streaming ASR, listen-while-speaking LLM, streaming TTS).

Public API: :class:`Agent` (models loaded once) and :class:`Session` (one conversation); events in
:mod:`duplex.events`; configuration in :class:`AgentConfig`. Imports are lazy so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Agent", "AgentConfig", "Session", "TurnConfig", "events"]

if TYPE_CHECKING:
    from duplex import events
    from duplex.agent import Agent
    from duplex.config import AgentConfig, TurnConfig
    from duplex.session import Session


def __getattr__(name: str) -> Any:
    if name == "Agent":
        from duplex.agent import Agent

        return Agent
    if name == "Session":
        from duplex.session import Session

        return Session
    if name in ("AgentConfig", "TurnConfig"):
        from duplex import config

        return getattr(config, name)
    if name == "events":
        import importlib

        return importlib.import_module("duplex.events")
    raise AttributeError(f"module 'duplex' has no attribute {name!r}")
