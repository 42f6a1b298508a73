"""Shared test fixtures: real speech, the real VAD, agents on the fake profile, the cache dir.

Each area's own fixtures (tiny ASR/LLM/TTS models) live in tests/<area>_fixtures.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
JFK = ROOT / "duplex" / "data" / "jfk.flac"  # the package ships a copy of ../shared/data/jfk.flac

# Tiny models are built once and cached; a run reuses the cache of the previous one.
os.environ.setdefault("DUPLEX_CACHE", str(ROOT / ".cache" / "duplex"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Where JFK's four phrases start and end (seconds), from listening and the waveform.
JFK_PHRASES = [(0.35, 2.24), (3.30, 4.42), (5.41, 7.65), (8.19, 10.59)]


@pytest.fixture(autouse=True)
def _logging_restored():
    """Every test starts with the logging setup the run began with: ``duplex.cli.main`` sets the
    ``duplex`` logger's level and the root's handlers (a ``doctor`` run leaves ``duplex`` at WARNING),
    which would hide a later test's INFO lines from caplog, depending on the order tests ran in."""
    root, ours = logging.getLogger(), logging.getLogger("duplex")
    before = root.level, root.handlers[:], ours.level, ours.handlers[:], ours.propagate
    yield
    root.setLevel(before[0])
    root.handlers[:] = before[1]
    ours.setLevel(before[2])
    ours.handlers[:] = before[3]
    ours.propagate = before[4]


@pytest.fixture(scope="session")
def jfk_path() -> Path:
    return JFK


@pytest.fixture(scope="session")
def jfk16() -> np.ndarray:
    """JFK's speech as 16 kHz mono float32."""
    from duplex.audio import read_audio

    return read_audio(JFK, 16_000)[0]


@pytest.fixture(scope="session")
def vad_model():
    from duplex.asr.vad import SileroVAD

    return SileroVAD()


@pytest.fixture
def artifacts(request) -> Path:
    """A folder kept after the run (tests/artifacts/<test name>) for screenshots, wavs, timelines."""
    path = ROOT / "artifacts" / "tests" / request.node.name.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path
