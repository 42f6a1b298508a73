"""A Python WebRTC peer of ``duplex serve``: what the browser page does, for tests and benchmarks.

:func:`connect` offers a microphone track (e.g. :func:`file_track`, a file played in real time) over
the same signalling as the page, opens the "events" data channel, and records what comes back: the
agent's audio frames (with their arrival times) and the data-channel messages.
"""

from __future__ import annotations

import asyncio
import fractions
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from duplex.audio import to_int16, to_mono_float
from duplex.transport.peer import set_input_prefetch
from duplex.transport.tracks import frame_to_pcm

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection


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
            self.first_loud_wall: float | None = None  # loop time the first loud frame was sent

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
            if self.first_loud_wall is None and np.sqrt(np.mean((block / 32768.0) ** 2)) > 0.03:
                self.first_loud_wall = loop.time()
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

    pc: RTCPeerConnection
    channel: RTCDataChannel
    pc_id: str = ""
    secret: str = ""  # from the server's answer: renegotiation and candidates need it
    answer: dict = field(default_factory=dict)  # the server's answer (resume_token, resumed ...)
    messages: list[dict] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # received agent audio, [T] float32 mono
    frame_walls: list[float] = field(default_factory=list)  # loop time each frame came out of the decoder
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


async def connect(base_url: str, mic, *, trickle: bool = False, restart_of: Client | None = None,
                  prefetch: int | None = None, token: str | None = None, resume: str | None = None) -> Client:
    """Offer ``mic`` to the server like the page does (data channel "events", audio sendrecv);
    ``restart_of`` sends the offer as a restart of that client's connection (Pipecat's ``restart_pc``,
    with its secret); ``token`` is the server's ``--token``; ``resume``: an earlier answer's
    ``resume_token``, to continue that conversation;
    ``prefetch`` sets this side's jitter buffer (frames held before decoding; aiortc's default 4)."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only (no STUN lookups)
    channel = pc.createDataChannel("events", ordered=True)
    client = Client(pc=pc, channel=channel)

    @channel.on("message")
    def _message(text: str) -> None:
        message = json.loads(text)
        message["_received"] = asyncio.get_event_loop().time()  # loop clock, as the server's event walls
        client.messages.append(message)
        client.got.set()

    async def receive(track) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await track.recv()
                pcm, rate = frame_to_pcm(frame)
                client.frame_layouts.add(f"{frame.layout.name} {rate}")
                client.frames.append(to_mono_float(pcm, rate))
                client.frame_walls.append(loop.time())
        except MediaStreamError:
            return

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState in ("closed", "failed"):
            client.ended.set()

    @pc.on("track")
    def _track(track) -> None:
        if prefetch is not None:
            set_input_prefetch(pc, track, prefetch)
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
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        body: dict[str, object] = {
            "sdp": sdp, "type": "offer", "pc_id": restart_of.pc_id if restart_of else None,
            "restart_pc": restart_of is not None, "secret": restart_of.secret if restart_of else None,
            "resume": resume}
        async with http.post(f"{base_url}/api/offer", json=body) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        client.pc_id, client.secret, client.answer = answer["pc_id"], answer["secret"], answer
        if trickle:
            body = {"pc_id": client.pc_id, "secret": client.secret, "candidates": [
                {"candidate": c, "sdp_mid": "0", "sdp_mline_index": 0} for c in candidates]}
            async with http.patch(f"{base_url}/api/offer", json=body) as r:
                assert r.status == 200, await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return client
