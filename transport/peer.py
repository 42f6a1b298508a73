"""One WebRTC peer: an aiortc peer connection and the Session it talks to, opened and closed as one.

A :class:`Peer` owns two tasks, and feeds aiortc's sender; :meth:`Peer.close` ends them all, and
every way out leads to it (the peer hangs up, its connection fails, its microphone stays silent past
``idle_timeout_s`` because it vanished, the session ends on a fatal error, the server shuts down):

- ``mic``: the remote audio track into ``session.push_audio`` (:func:`~.tracks.pump_microphone`);
- ``events``: session events as JSON on the data channel the page opened (:mod:`.realtime`);
- aiortc's sender pulls the agent's voice from :func:`~.tracks.agent_audio_track` (stopped on close).

The page may send ``{"type": "client.stats", "jitter_buffer_s": x}`` on the data channel: its
measured playout delay, which (plus what waits on this side) becomes ``session.output_latency_s``.
"""

from __future__ import annotations

import asyncio
import time
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duplex import events as ev
from duplex.agent import Agent
from duplex.session import Session
from duplex.transport.realtime import RealtimeEncoder
from duplex.transport.signalling import Candidate, Offer
from duplex.transport.tracks import InputStats, agent_audio_track, pump_microphone

if TYPE_CHECKING:
    from duplex.conversation import Conversation

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 5.0  # aiortc's close of a connection whose peer is gone can wait on the network

MAX_CLIENT_MESSAGE = 4_096
MAX_BACKLOG = 500  # events kept for a data channel that is not open yet
MAX_CHANNEL_BUFFER = 4 * 1024 * 1024  # bytes queued on the data channel before events are dropped


@dataclass
class PeerOptions:
    idle_timeout_s: float = 4.0  # no microphone frame for this long: the peer is gone (released within 5 s)
    first_frame_timeout_s: float = 15.0  # ... except before its first frame (the connection is being set up)
    # Microphone frames aiortc holds before decoding the oldest (its default is 4: 80 ms added to
    # every turn's latency and to every barge-in). 0: each packet is decoded as it arrives (the VAD
    # and the ASR take audio by its arrival and need no smoothing; a packet older than one already
    # decoded is dropped, as a late one would be). 1 or 2 absorb reordering by that many packets.
    input_prefetch: int = 0
    # The agent's voice that may wait for aiortc's sender (whole 20 ms frames, at least one). The
    # sender takes each frame at once, so this is slack for a stalled event loop, not latency: a
    # sender further behind loses the oldest frames (audible, counted in the track's ``dropped``).
    # At a barge-in whatever waits is taken back unheard (see Session.audio(live=True)), so a
    # larger bound costs a barge-in nothing.
    output_buffer_ms: int = 200
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs; none by default (aiortc's default is Google's STUN)
    # --record DIR: each session writes its recording (duplex.recording) to DIR/<its connection id>
    record_dir: str | None = None

    def __post_init__(self) -> None:
        from duplex.errors import ConfigError

        if isinstance(self.output_buffer_ms, bool) or not isinstance(self.output_buffer_ms, int) \
                or not 20 <= self.output_buffer_ms <= 1000:
            raise ConfigError(f"--output-buffer-ms must be a whole number of milliseconds from 20 to 1000 "
                              f"(one to fifty 20 ms frames), got {self.output_buffer_ms!r}")
        if self.record_dir is not None and Path(self.record_dir).exists() and not Path(self.record_dir).is_dir():
            raise ConfigError(f"--record {self.record_dir} is a file; give a folder (it is created if missing)")
        if self.input_prefetch not in range(0, 9):
            raise ConfigError(f"input_prefetch must be 0 to 8 frames, got {self.input_prefetch!r}")


@dataclass
class Peer:
    pc_id: str
    pc: Any  # aiortc RTCPeerConnection
    session: Session
    track: Any  # AgentAudioTrack
    options: PeerOptions
    on_closed: Callable[[Peer], None]
    input: InputStats = field(default_factory=InputStats)
    channel: Any = None  # RTCDataChannel opened by the page
    sent: int = 0  # data-channel messages sent
    dropped: int = 0  # ... and dropped because the channel was backed up
    close_reason: str = ""
    closed: bool = False
    secret: str = ""  # given to the page in its answer; renegotiation and candidates need it
    resume_token: str = ""  # given in the answer too: a later session may continue this conversation with it
    metrics: dict[str, float] = field(default_factory=dict)  # the latest value of each Metric event
    opened_at: float = field(default_factory=time.monotonic)
    _backlog: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _closing: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"{self.pc_id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close_soon(self, reason: str) -> None:
        """Start closing (safe from callbacks and from the peer's own tasks)."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(reason), name=f"{self.pc_id}-close")

    async def close(self, reason: str = "closed") -> None:
        """Stop everything of this peer and wait for it (idempotent; every caller waits for the one
        closing, which a cancelled caller does not interrupt)."""
        self.close_soon(reason)
        assert self._closing is not None
        await asyncio.shield(self._closing)

    async def _close(self, reason: str) -> None:
        """Its tasks, the session (and with it the models' per-session state), the connection."""
        self.closed = True
        self.close_reason = reason
        log.info("%s: closing (%s)", self.pc_id, reason)
        try:
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            if tasks:  # a task that loses its cancel (see pump_microphone) must not hold the close up
                _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
                if pending:
                    log.warning("%s: %s did not stop when cancelled", self.pc_id, [t.get_name() for t in pending])
            await self.session.close()
            self.track.stop()
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("%s: the connection did not close within %.0f s; dropped", self.pc_id, CLOSE_TIMEOUT_S)
        except Exception:
            log.exception("%s: closing failed", self.pc_id)
        finally:
            self.on_closed(self)

    # -- data channel ------------------------------------------------------------------------------

    def attach_channel(self, channel: Any) -> None:
        if self.channel is not None:
            return  # the first channel the page opens carries the events
        self.channel = channel

        @channel.on("open")
        def _open() -> None:
            self._flush_backlog()

        @channel.on("message")
        def _message(message: object) -> None:
            self.on_client_message(message)

        if channel.readyState == "open":
            self._flush_backlog()

    def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, separators=(",", ":"))
        channel = self.channel
        if channel is None or channel.readyState != "open":
            self._backlog.append(text)
            if len(self._backlog) > MAX_BACKLOG:
                del self._backlog[0]
                self.dropped += 1
            return
        if channel.bufferedAmount > MAX_CHANNEL_BUFFER:
            self.dropped += 1
            return
        channel.send(text)
        self.sent += 1

    def _flush_backlog(self) -> None:
        backlog, self._backlog = self._backlog, []
        for text in backlog:
            self.channel.send(text)
            self.sent += 1

    def on_client_message(self, message: object) -> None:
        """Messages from the page: its playout delay; anything else (keep-alive pings, junk) is ignored."""
        if not isinstance(message, str) or len(message) > MAX_CLIENT_MESSAGE or not message.startswith("{"):
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        if not isinstance(data, dict) or data.get("type") != "client.stats":
            return
        jitter = data.get("jitter_buffer_s")
        if isinstance(jitter, (int, float)) and not isinstance(jitter, bool) and 0 <= jitter <= 2.0:
            self.session.output_latency_s = round(float(jitter) + self.track.buffered_s(), 4)

    # -- tasks -------------------------------------------------------------------------------------

    async def forward_events(self, events: Any) -> None:
        encoder = RealtimeEncoder(self.session.t0, self.session.output_rate)
        self.send({"type": "session.created", "session": {"id": self.pc_id, "output_rate": 48_000,
                                                           "input_rate": 16_000}})
        self.send({"type": "agent.state", "state": self.session.state})  # the page shows it from the start
        reason = "the session ended"
        try:
            async for event in events:
                if isinstance(event, ev.Metric):
                    self.metrics[event.name] = round(event.value, 4)
                message = encoder.encode(event)
                if message is not None:
                    self.send(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. the data channel broke: the peer is unusable
            log.exception("%s: sending events failed", self.pc_id)
            reason = f"sending events failed: {exc}"
        self.close_soon(reason)

    async def pump(self, track: Any) -> None:
        try:
            reason = await pump_microphone(track, self.session, self.input, self.options.idle_timeout_s,
                                           self.options.first_frame_timeout_s, stopped=lambda: self.closed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # audio the session cannot use
            log.exception("%s: microphone audio failed", self.pc_id)
            reason = f"microphone audio failed: {exc}"
        self.close_soon(reason)


def peer_options_from_args(args: Any) -> PeerOptions:
    """The peer options ``duplex serve``'s flags set (--output-buffer-ms, --record), for the single
    server, its workers and the cluster's replicas alike."""
    ms = getattr(args, "output_buffer_ms", None)
    options = PeerOptions(record_dir=getattr(args, "record", None))
    return options if ms is None else PeerOptions(output_buffer_ms=ms, record_dir=options.record_dir)


async def open_peer(agent: Agent, offer: Offer, options: PeerOptions, on_closed: Callable[[Peer], None], *,
                    resume: Conversation | None = None) -> tuple[Peer, dict[str, str]]:
    """Answer ``offer`` with a new peer connection and session (continuing ``resume``'s conversation
    if given); returns the peer and the answer.

    On any failure everything made so far is closed again before the exception propagates."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

    config = RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in options.ice_servers])
    pc = RTCPeerConnection(configuration=config)
    pc_id = f"pc_{secrets.token_hex(8)}"
    session = agent.session(record=None if options.record_dir is None else Path(options.record_dir) / pc_id,
                            resume=resume)
    track = agent_audio_track(session, queue_frames=max(1, options.output_buffer_ms // 20))
    peer = Peer(pc_id=pc_id, pc=pc, session=session, track=track, options=options,
                on_closed=on_closed)
    try:
        events = session.events()
        wired = False

        @pc.on("track")
        def _track(remote: Any) -> None:
            nonlocal wired
            if remote.kind == "audio" and not wired:
                wired = True
                set_input_prefetch(pc, remote, options.input_prefetch)
                pc.addTrack(track)
                peer.spawn(peer.pump(remote), "mic")

        @pc.on("datachannel")
        def _channel(channel: Any) -> None:
            peer.attach_channel(channel)

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                peer.close_soon(f"connection {pc.connectionState}")

        await _negotiate(pc, offer)
        if not wired:
            raise ValueError("the offer carries no audio track to receive")
        peer.spawn(peer.forward_events(events), "events")
    except BaseException:
        await peer.close("the offer could not be answered")
        raise
    return peer, {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "pc_id": peer.pc_id}


async def renegotiate(peer: Peer, offer: Offer) -> dict[str, str]:
    """A new offer on an existing connection (e.g. the page re-offers after a track change)."""
    await _negotiate(peer.pc, offer)
    local = peer.pc.localDescription
    return {"sdp": local.sdp, "type": local.type, "pc_id": peer.pc_id}


def set_input_prefetch(pc: Any, remote: Any, prefetch: int) -> None:
    """Give the receiver of ``remote`` a jitter buffer that holds ``prefetch`` frames, 0 for none
    (aiortc has no option for it; its receiver keeps the buffer in a private attribute, replaced here
    before any packet arrives). Left alone if aiortc's internals differ."""
    from aiortc.jitterbuffer import JitterBuffer

    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if receiver.track is remote and hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            receiver._RTCRtpReceiver__jitter_buffer = (
                _no_jitter_buffer() if prefetch == 0 else JitterBuffer(capacity=16, prefetch=prefetch))
            return
    log.debug("could not set the microphone jitter buffer; aiortc's default stays")


def _no_jitter_buffer() -> Any:
    """aiortc's audio jitter buffer without the wait: every Opus packet (one packet, one frame) is a
    frame at once. aiortc's own releases a frame only when ``prefetch`` later ones have arrived (it
    knows a frame is complete when the next one begins: 20 ms even at ``prefetch=1``)."""
    from aiortc.jitterbuffer import JitterBuffer, JitterFrame
    from aiortc.utils import uint16_add

    class NoJitterBuffer(JitterBuffer):
        def __init__(self) -> None:
            super().__init__(capacity=16)
            self._newest: int | None = None

        def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
            seq = packet.sequence_number
            if self._newest is not None and 0 < uint16_add(self._newest, -seq) < 0x8000:
                return False, None  # older than one already decoded: too late to use
            if seq == self._newest:
                return False, None  # a duplicate
            self._newest = seq
            return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)

    return NoJitterBuffer()


async def _negotiate(pc: Any, offer: Offer) -> None:
    """Apply the offer and make the answer. The offer is the only input here, so whatever aiortc
    raises on it (its parser signals bad input with assorted exception types) is the offer's fault:
    it becomes a ValueError that the server answers with 400."""
    from aiortc import RTCSessionDescription

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type=offer.type))
        await pc.setLocalDescription(await pc.createAnswer())
    except (asyncio.CancelledError, MemoryError):
        raise
    except Exception as exc:
        log.info("refused an offer: %s: %s", type(exc).__name__, exc)
        log.debug("refused offer", exc_info=True)
        text = str(exc) or f"the WebRTC stack could not use it ({type(exc).__name__})"
        raise ValueError(text) from exc


async def add_candidates(peer: Peer, candidates: tuple[Candidate, ...]) -> None:
    from aiortc import RTCIceCandidate

    for c in candidates:
        if c.end_of_candidates:
            await peer.pc.addIceCandidate(None)
            continue
        candidate = RTCIceCandidate(component=c.component, foundation=c.foundation, ip=c.ip, port=c.port,
                                    priority=c.priority, protocol=c.protocol, type=c.type,
                                    relatedAddress=c.related_address, relatedPort=c.related_port,
                                    sdpMid=c.sdp_mid, sdpMLineIndex=c.sdp_mline_index, tcpType=c.tcp_type)
        await peer.pc.addIceCandidate(candidate)
