"""Transport benchmark: what the WebRTC path adds, and what a connection costs, on this machine.

N real aiortc peers (:mod:`.client`) talk to the server over loopback at once, each sending JFK's
speech as its microphone, with the ``fake`` models behind the server (the figures are the transport's,
so the models must not compete for the CPU). Measured, per peer, on the one loop clock both ends share:

- ``mic_to_server_ms``: the first loud microphone frame leaving the peer to it reaching the session
  (Opus encode, SRTP, UDP, the server's jitter buffer of ``PeerOptions.input_prefetch`` frames,
  decode);
- ``voice_to_peer_ms``: the session emitting a reply's first frame to the peer decoding it (the
  track's resampling and queue, Opus, SRTP, UDP, and the peer's jitter buffer, set to its minimum
  of one frame here: a browser's adaptive one adds its own, which the page reports back);
- ``event_ms``: a session event made to the data-channel message arriving (JSON, SCTP, DTLS);
- ``cpu_core_per_peer``: process CPU seconds per wall second per peer, both ends of every connection
  included (so the server's share is roughly half).

Run: ``python -m duplex.transport.bench [--peers 1 4 8] [--seconds 8]``, or as ``run(args)`` from
``duplex bench`` (``--quick``: 1 and 4 peers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time

import numpy as np

from duplex.agent import Agent
from duplex.audio import SAMPLE_SPEECH, read_audio, resample
from duplex.config import AgentConfig


FAKE = {"llm": {"eot": 0.9, "ttft_s": 0.1, "token_s": 0.02}, "tts": {"word_s": 0.25, "first_chunk_s": 0.05}}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def measure(peers: int, seconds: float) -> dict[str, float | None]:

    from duplex.transport.client import connect, file_track
    from duplex.transport.ice import allow_loopback_candidates
    from duplex.transport.server import Server, ServerOptions

    allow_loopback_candidates()
    pcm, rate = read_audio(SAMPLE_SPEECH)
    speech = np.concatenate([resample(pcm, rate, 48_000), np.zeros(48_000 * 4, np.float32)])
    agent = await Agent.load(AgentConfig(profile="fake", device="cpu", fake=dict(FAKE)))
    server = Server(agent, ServerOptions(max_sessions=peers))
    loop = asyncio.get_running_loop()
    clients, mics = [], []
    try:
        async with server.on_loopback() as url:
            try:
                mics = [file_track(speech) for _ in range(peers)]
                clients = list(await asyncio.gather(*(connect(url, m, prefetch=1) for m in mics)))
                await asyncio.gather(*(c.wait_for("session.created", timeout=20) for c in clients))
                sessions = {c.pc_id: server.peers[c.pc_id] for c in clients}
                cpu0, wall0 = time.process_time(), loop.time()
                await asyncio.sleep(seconds)
                cpu = (time.process_time() - cpu0) / (loop.time() - wall0)
                mic_ms, voice_ms, event_ms, lost = [], [], [], 0
                for c, mic in zip(clients, mics):
                    peer = sessions[c.pc_id]
                    if mic.first_loud_wall is not None and peer.input.first_loud_wall is not None:
                        mic_ms.append(1000 * (peer.input.first_loud_wall - mic.first_loud_wall))
                    t0 = peer.session.t0
                    out = next((m for m in c.messages if m["type"] == "output_audio_buffer.started"), None)
                    if out is not None:
                        heard = next((w for w, f in zip(c.frame_walls, c.frames) if w >= t0 + out["t"] - 0.005
                                      and np.abs(f).max() > 0.01), None)
                        if heard is not None:
                            voice_ms.append(1000 * (heard - (t0 + out["t"])))
                    event_ms += [1000 * (m["_received"] - (t0 + m["t"])) for m in c.messages if "t" in m]
                    lost += peer.track.dropped
                return {"peers": peers, "seconds": seconds,
                        "mic_to_server_ms_median": round(statistics.median(mic_ms), 1) if mic_ms else None,
                        "voice_to_peer_ms_median": round(statistics.median(voice_ms), 1) if voice_ms else None,
                        "voice_to_peer_ms_p95": round(_pct(voice_ms, 95), 1) if voice_ms else None,
                        "event_ms_median": round(statistics.median(event_ms), 2) if event_ms else None,
                        "event_ms_p95": round(_pct(event_ms, 95), 2) if event_ms else None,
                        "cpu_core_per_peer": round(cpu / peers, 3), "frames_dropped": lost,
                        "replies_heard": len(voice_ms)}
            finally:
                for c in clients:
                    with contextlib.suppress(Exception):
                        await c.close()
    finally:
        await agent.aclose()


def _table(rows: list[dict[str, float | None]]) -> str:
    cols = ["peers", "mic_to_server_ms_median", "voice_to_peer_ms_median", "voice_to_peer_ms_p95",
            "event_ms_median", "event_ms_p95", "cpu_core_per_peer", "frames_dropped"]
    heads = ["peers", "mic->server ms", "voice->peer ms", "p95", "event ms", "p95", "CPU core/peer", "dropped"]
    lines = ["  ".join(f"{h:>14}" for h in heads)]
    for r in rows:
        lines.append("  ".join(f"{r.get(c) if r.get(c) is not None else '-':>14}" for c in cols))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """``duplex bench``-style entry: prints the table and returns the figures."""
    counts = getattr(args, "peers", None) or ([1, 4] if getattr(args, "quick", False) else [1, 4, 8])
    seconds = getattr(args, "seconds", None) or 8.0
    rows = []
    for n in counts:
        rows.append(asyncio.run(measure(n, seconds)))
        print(_table(rows[-1:]) if len(rows) == 1 else _table(rows[-1:]).splitlines()[1], flush=True)
    return {"runs": rows, "note": "fake models; both ends of every connection in this process"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=None, help="peer counts to run (default 1 4 8)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of conversation per run")
    parser.add_argument("--quick", action="store_true", help="1 and 4 peers")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
