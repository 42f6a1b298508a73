"""``duplex bench cluster --replicas N [--batch K ...]``: K real WebRTC sessions through the cluster's
ingress, spread over N replicas, each saying one phrase and waiting for the agent's answer.

Reported per replica and in total: sessions placed, sessions answered (a complete reply reached the
client), and the voice-to-voice latency the replicas measured (end of the user's speech to the
agent's first audio), p50 and max. The clients run in this process (aiortc), so on one small machine
they compete with the replicas for the CPU: absolute figures count from a GPU cluster, with clients
elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
from typing import Any

import numpy as np

ANSWER_TIMEOUT_S = 120.0


def _phrase() -> np.ndarray:
    from duplex.audio import SAMPLE_SPEECH, read_audio

    pcm, _ = read_audio(SAMPLE_SPEECH, 48_000)
    return np.concatenate([pcm[int(0.2 * 48_000):int(2.4 * 48_000)], np.zeros(10 * 48_000, np.float32)])


async def _converse(url: str, sessions: int) -> list[dict[str, Any]]:
    from duplex.transport.client import connect, file_track

    async def one(i: int) -> dict[str, Any]:
        client = await connect(url, file_track(_phrase()))
        row: dict[str, Any] = {"session": i, "replica": client.pc_id.split(".")[0], "answered": False,
                               "voice_to_voice_s": None}
        try:
            await client.wait_for("response.done", timeout=ANSWER_TIMEOUT_S)
            row["answered"] = True
            metrics = [m["value"] for m in client.of("agent.metric") if m["name"] == "voice_to_voice_s"]
            row["voice_to_voice_s"] = round(metrics[0], 3) if metrics else None
        except asyncio.TimeoutError:
            pass
        finally:
            await client.close()
        return row

    rows = []
    for i in range(sessions):  # offers one after another (placement sees each new session) ...
        rows.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.2)
    return list(await asyncio.gather(*rows))  # ... conversations at once


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    v2v = [r["voice_to_voice_s"] for r in rows if r["voice_to_voice_s"] is not None]
    return {"sessions": len(rows), "answered": sum(r["answered"] for r in rows),
            "voice_to_voice_p50_s": round(float(np.median(v2v)), 3) if v2v else None,
            "voice_to_voice_max_s": round(max(v2v), 3) if v2v else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from duplex.cli import config_from_args
    from duplex.cluster.app import ClusterOptions
    from duplex.cluster.launch import start, wait_ready
    from duplex.transport.ice import allow_loopback_candidates
    from duplex.transport.server import ServerOptions

    replicas = args.replicas or 2
    batches = args.batch or [2 * replicas]
    config = config_from_args(args)
    per_replica = max(1, math.ceil(max(batches) / replicas))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    allow_loopback_candidates()
    cluster = start(config, ClusterOptions(replicas=replicas, server=ServerOptions(max_sessions=per_replica),
                                           loopback=True), port=port, quiet=True)
    results: dict[str, Any] = {"replicas": replicas, "max_sessions_per_replica": per_replica, "runs": []}
    try:
        wait_ready(cluster)
        print(f"{replicas} replicas of at most {per_replica} sessions, profile {config.profile}")
        print(f"  {'sessions':>8s} {'replica':>9s} {'placed':>7s} {'answered':>9s} {'v2v p50':>8s} {'v2v max':>8s}")
        for sessions in batches:
            rows = asyncio.run(_converse(cluster.url, sessions))
            by_replica = {name: _summary([r for r in rows if r["replica"] == name]) for name in cluster.options.names()}
            total = _summary(rows)
            for name, s in [*by_replica.items(), ("total", total)]:
                print(f"  {sessions:8d} {name:>9s} {s['sessions']:7d} {s['answered']:9d} "
                      f"{s['voice_to_voice_p50_s']!s:>8s} {s['voice_to_voice_max_s']!s:>8s}", flush=True)
            results["runs"].append({"sessions": sessions, "replicas": by_replica, "total": total, "rows": rows})
    finally:
        cluster.stop()
    return results
