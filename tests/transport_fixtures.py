"""Helpers for the transport tests: an agent, a live server on a free port, and a real aiortc client.

``PROFILE`` picks the models behind the server: ``fake`` (scripted ASR/LLM/TTS with the real Silero
VAD) or ``tiny`` (the real architectures, tiny random weights). Switching is this one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duplex.agent import Agent
from duplex.audio import read_audio, resample, to_int16, write_wav
from duplex.config import AgentConfig, TurnConfig
from duplex.transport.ice import allow_loopback_candidates
from duplex.transport.peer import PeerOptions
from duplex.transport.server import Server, ServerOptions

PROFILE = "fake"

# Fake stages tuned for quick turns: the LLM calls every message complete, so a turn ends after
# min_silence_s (0.4 s) of silence; replies are a handful of beeps.
FAKE = {"llm": {"eot": 0.9, "ttft_s": 0.1, "token_s": 0.02}, "tts": {"word_s": 0.25, "first_chunk_s": 0.05}}


def agent_config(profile: str = PROFILE) -> AgentConfig:
    return AgentConfig(profile=profile, device="cpu", turn=TurnConfig(), fake=dict(FAKE)).validate()


async def load_agent(profile: str = PROFILE) -> Agent:
    return await Agent.load(agent_config(profile))


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
    from aiohttp import web

    allow_loopback_candidates()
    peer = PeerOptions(idle_timeout_s=options.pop("idle_timeout_s", 15.0))
    server = Server(agent, ServerOptions(peer=peer, **options))
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def file_track(pcm: np.ndarray, rate: int = 48_000):
    """An aiortc audio track that plays ``pcm`` (float32 mono at ``rate``) in real time as 20 ms
    s16 stereo frames (the layout browsers' Opus decodes to), then silence forever."""
    import av
    from aiortc.mediastreams import MediaStreamTrack

    step = rate // 50
    samples = to_int16(pcm)

    class FileTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.pos = 0
            self.start: float | None = None
            self.frozen = asyncio.Event()

        def freeze(self) -> None:
            """Send nothing more, without hanging up (a frozen tab, a dropped network)."""
            self.frozen.set()

        async def recv(self):
            loop = asyncio.get_running_loop()
            if self.frozen.is_set():
                await asyncio.Future()  # forever (until the connection is closed)
            if self.start is None:
                self.start = loop.time()
            await asyncio.sleep(max(0.0, self.start + self.pos / rate - loop.time()))
            block = samples[self.pos:self.pos + step]
            block = np.concatenate([block, np.zeros(step - len(block), np.int16)])
            stereo = np.repeat(block[:, None], 2, axis=1).reshape(1, -1)  # packed L R L R
            frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
            frame.sample_rate, frame.pts = rate, self.pos
            frame.time_base = fractions.Fraction(1, rate)
            self.pos += step
            return frame

    return FileTrack()


@dataclass
class Client:
    """A real aiortc peer of the server: sends a microphone track, records what comes back."""

    pc: object
    channel: object
    pc_id: str = ""
    messages: list[dict] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # received agent audio, [T] float32 mono
    frame_layouts: set[str] = field(default_factory=set)
    got: asyncio.Event = field(default_factory=asyncio.Event)  # set on every message
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # the connection closed or failed
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]

    async def wait_for(self, kind: str, timeout: float = 20.0, count: int = 1) -> list[dict]:
        async def until() -> list[dict]:
            while len(self.of(kind)) < count:
                self.got.clear()
                await self.got.wait()
            return self.of(kind)

        return await asyncio.wait_for(until(), timeout)

    async def wait_for_close(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.ended.wait(), timeout)

    def audio(self) -> np.ndarray:
        return np.concatenate(self.frames) if self.frames else np.zeros(0, np.float32)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


async def connect(base_url: str, mic, *, trickle: bool = False, restart_of: str | None = None) -> Client:
    """Offer ``mic`` to the server like the page does (data channel "events", audio sendrecv);
    ``restart_of`` sends the offer as a restart of that connection (Pipecat's ``restart_pc``)."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection()
    channel = pc.createDataChannel("events", ordered=True)
    client = Client(pc=pc, channel=channel)

    @channel.on("message")
    def _message(text: str) -> None:
        client.messages.append(json.loads(text))
        client.got.set()

    async def receive(track) -> None:
        from duplex.transport.tracks import frame_to_pcm

        try:
            while True:
                frame = await track.recv()
                pcm, rate = frame_to_pcm(frame)
                client.frame_layouts.add(f"{frame.layout.name} {rate}")
                client.frames.append(pcm.astype(np.float32).mean(axis=1) / 32768.0)
        except MediaStreamError:
            return

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState in ("closed", "failed"):
            client.ended.set()

    @pc.on("track")
    def _track(track) -> None:
        client._tasks.append(asyncio.create_task(receive(track)))

    pc.addTrack(mic)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    if trickle:  # send the offer bare and its candidates by PATCH, as a browser trickling ICE does
        lines = sdp.splitlines()
        first_section = lines[:next(i for i, line in enumerate(lines) if line.startswith("m=application"))]
        candidates = [line[2:] for line in first_section if line.startswith("a=candidate:")]  # mid 0 (bundled)
        sdp = "\r\n".join(line for line in lines
                           if not line.startswith(("a=candidate:", "a=end-of-candidates"))) + "\r\n"
    async with aiohttp.ClientSession() as http:
        body = {"sdp": sdp, "type": "offer", "pc_id": restart_of, "restart_pc": restart_of is not None}
        async with http.post(f"{base_url}/api/offer", json=body) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        client.pc_id = answer["pc_id"]
        if trickle:
            body = {"pc_id": client.pc_id, "candidates": [
                {"candidate": c, "sdp_mid": "0", "sdp_mline_index": 0} for c in candidates]}
            async with http.patch(f"{base_url}/api/offer", json=body) as r:
                assert r.status == 200, await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return client


def jfk48(jfk_path: Path, tail_s: float = 3.0) -> np.ndarray:
    pcm, rate = read_audio(jfk_path)
    return np.concatenate([resample(pcm, rate, 48_000), np.zeros(int(tail_s * 48_000), np.float32)])


def room_response(gain: float = 0.6, delay_ms: float = 30.0, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """The impulse response from a speaker to a microphone in a room: a direct path after
    ``delay_ms`` and a reverberant tail (decaying noise, ~60 ms, half the direct path's energy),
    scaled by ``gain``."""
    rng = np.random.default_rng(seed)
    d, n = int(delay_ms * rate / 1000), int(0.12 * rate)
    tail = rng.standard_normal(n) * np.exp(-np.arange(n) / (0.02 * rate))
    tail *= np.sqrt(0.5 / np.sum(tail ** 2))
    h = np.zeros(d + rate // 800 + n)
    h[d] = 1.0
    h[d + rate // 800:] += tail
    return gain * h


def room_echo(ref: np.ndarray, gain: float = 0.6, delay_ms: float = 30.0, rate: int = 16_000,
              seed: int = 0) -> np.ndarray:
    """``ref`` as a microphone hears it from a speaker in a room (see :func:`room_response`)."""
    return np.convolve(ref, room_response(gain, delay_ms, rate, seed))[:len(ref)].astype(np.float32)
