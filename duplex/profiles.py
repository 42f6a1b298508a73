"""Model profiles: which implementation fills each stage.

- ``pretrained``: real checkpoints (the default for real use);
- ``tiny``: the real architectures with tiny random weights, built once and cached (any machine);
- ``random``: full-size architectures with random weights (speed measurements);
- ``fake``: scripted ASR/LLM/TTS (:mod:`duplex.fakes`) with the real VAD, for orchestration tests.

Each stage package exposes one builder, ``build_<role>(config, device) -> model``, that handles the
real profiles; this table names them so nothing heavy is imported until a profile is built.
"""

from __future__ import annotations

import importlib
import logging

from duplex.config import AgentConfig
from duplex.requirements import missing_module
from duplex.stages import Stages
from duplex.worker import configure_torch

log = logging.getLogger(__name__)

BUILDERS: dict[str, str] = {
    "vad": "duplex.asr.vad:build_vad",
    "asr": "duplex.asr.profiles:build_asr",
    "llm": "duplex.llm.profiles:build_llm",
    "tts": "duplex.tts.profiles:build_tts",
}


def _builder(role: str):
    module_name, func = BUILDERS[role].split(":")
    return getattr(importlib.import_module(module_name), func)


def build_stage(role: str, config: AgentConfig, device: str):
    """Build one stage's model for ``config.profile`` (blocking: call it off the event loop)."""
    if config.profile == "fake" and role != "vad":
        from duplex import fakes

        return fakes.build(role, config)
    log.info("loading %s (%s profile) on %s", role, config.profile, device)
    try:
        return _builder(role)(config, device)
    except ModuleNotFoundError as exc:  # an import inside the stage: name the extra that brings it
        raise missing_module(exc, f"the {role} stage of the {config.profile} profile") from exc


def build_stages(config: AgentConfig) -> Stages:
    """Build all four stages (blocking)."""
    config.validate()
    if config.profile == "pretrained":
        from duplex.models import require

        require(config)  # one message naming every missing checkpoint, before loading anything
    device = config.resolved_device()
    configure_torch(device)
    return Stages(**{role: build_stage(role, config, device) for role in ("vad", "asr", "llm", "tts")})
