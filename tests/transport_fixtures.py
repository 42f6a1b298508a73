"""Helpers for the transport tests: an agent, a live server on a free port, a simulated room, and the
real aiortc client of :mod:`duplex.transport.client`.

Which models stand behind the server: ``fake`` (scripted ASR/LLM/TTS with the real Silero VAD:
deterministic and light, for the hygiene, browser and mic tests) or ``tiny`` (the real architectures
with tiny random weights: every real stage on the path, for the main in-process WebRTC test).
Switching either is its one line below.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from duplex.agent import Agent
from duplex.audio import read_audio, resample, write_wav
from duplex.config import AgentConfig, TurnConfig
from duplex.transport.client import Client, connect, file_track  # noqa: F401 (re-exported for the tests)
from duplex.transport.ice import allow_loopback_candidates
from duplex.transport.peer import PeerOptions
from duplex.transport.server import Server, ServerOptions

PROFILE = "fake"  # most transport tests
PEER_PROFILE = "tiny"  # test_transport_webrtc.py::test_peer_talks_to_the_agent_over_webrtc
# How much longer to wait for a turn of PEER_PROFILE than of the fake stages: real models on two
# CPU cores that a browser, or a CI machine's other load, shares (a wait only costs when it fails)
SLOW = 3.0 if PEER_PROFILE == "tiny" else 1.0

# Fake stages tuned for quick turns: the LLM calls every message complete, so a turn ends after
# min_silence_s (0.4 s) of silence; replies are a handful of beeps.
FAKE = {"llm": {"eot": 0.9, "ttft_s": 0.1, "token_s": 0.02}, "tts": {"word_s": 0.25, "first_chunk_s": 0.05}}


def agent_config(profile: str = PROFILE, llm: dict | None = None) -> AgentConfig:
    """The transport tests' agent; ``llm``: options of the fake LLM over :data:`FAKE`'s."""
    # Real (tiny) models babble until max_reply_tokens: keep replies a few seconds long.
    fake = {**FAKE, "llm": {**FAKE["llm"], **(llm or {})}}
    return AgentConfig(profile=profile, device="cpu", turn=TurnConfig(), fake=fake, max_reply_tokens=12).validate()


async def load_agent(profile: str = PROFILE, llm: dict | None = None) -> Agent:
    return await Agent.load(agent_config(profile, llm))


def speech_wav(jfk_path: Path, folder: Path, tail_s: float = 4.0, rate: int = 48_000) -> Path:
    """JFK's speech as a mono 16-bit WAV (Chromium's fake microphone cannot use FLAC) with
    ``tail_s`` of silence after it, so a looping player leaves room for the agent's turn."""
    pcm, _ = read_audio(jfk_path, rate)
    path = folder / f"jfk_{rate // 1000}k_tail{tail_s:g}.wav"
    write_wav(path, np.concatenate([pcm, np.zeros(int(tail_s * rate), np.float32)]), rate)
    return path


@contextlib.asynccontextmanager
async def running_server(agent: Agent, **options) -> AsyncIterator[tuple[Server, str]]:
    """The duplex server on 127.0.0.1 and a free port, in the running loop; closed on exit."""
    allow_loopback_candidates()
    peer = PeerOptions(idle_timeout_s=options.pop("idle_timeout_s", PeerOptions.idle_timeout_s),
                       record_dir=options.pop("record_dir", None))
    server = Server(agent, ServerOptions(peer=peer, **options))
    async with server.on_loopback() as url:
        yield server, url


def jfk48(jfk_path: Path, tail_s: float = 3.0) -> np.ndarray:
    pcm, rate = read_audio(jfk_path)
    return np.concatenate([resample(pcm, rate, 48_000), np.zeros(int(tail_s * 48_000), np.float32)])
