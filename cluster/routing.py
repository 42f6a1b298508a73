"""What the cluster's ingress decides, as plain functions (no Ray here, so they are tested alone):

- a session's public id names the replica that owns it (``agent-1.<the replica's own id>``), so every
  follow-up of a session (candidates, renegotiation, restart) reaches its owner with no table to keep;
- a new session goes to the replica with the most free capacity (ties: the lowest name), never to one
  that is full, still loading or not answering;
- the status of every replica, summed, and the same figures in Prometheus' text format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEPARATOR = "."


def public_id(replica: str, pc_id: str) -> str:
    """The id a page sees for connection ``pc_id`` of ``replica``."""
    return f"{replica}{SEPARATOR}{pc_id}"


def owner_of(session_id: str, replicas: list[str]) -> tuple[str, str] | None:
    """``(replica, the replica's own id)`` of a public id, or None if it names no replica of ours."""
    replica, sep, pc_id = session_id.partition(SEPARATOR)
    if not sep or not pc_id or replica not in replicas:
        return None
    return replica, pc_id


@dataclass
class Capacity:
    """What one replica says about room for new sessions (``up`` False: it did not answer in time)."""

    replica: str
    up: bool
    ready: bool = False  # its models are loaded
    free: int = 0
    holds: bool = False  # it has the session the ingress asked about open


def placement(capacities: list[Capacity]) -> list[str]:
    """The replicas to try for a new session, best first: ready ones with room, most free first."""
    usable = [c for c in capacities if c.up and c.ready and c.free > 0]
    return [c.replica for c in sorted(usable, key=lambda c: (-c.free, c.replica))]


@dataclass
class ReplicaStatus:
    replica: str
    up: bool
    body: dict[str, Any] = field(default_factory=dict)  # the replica's own status (see Server.status_body)


def cluster_status(replicas: list[ReplicaStatus]) -> dict[str, Any]:
    """The status of the whole cluster: totals over the replicas that answered, and each replica."""
    up = [r for r in replicas if r.up]
    rows = []
    for r in replicas:
        row: dict[str, Any] = {"name": r.replica, "up": r.up}
        if r.up:
            row.update(r.body)
            if "peers" in row:  # operator view: the ids pages use
                row["peers"] = {public_id(r.replica, pid): p for pid, p in row["peers"].items()}
        rows.append(row)
    return {
        "sessions": sum(int(r.body.get("sessions", 0)) for r in up),
        "max_sessions": sum(int(r.body.get("max_sessions", 0)) for r in up),
        "replicas_up": len(up),
        "replicas": rows,
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(replicas: list[ReplicaStatus]) -> str:
    """The cluster's figures in Prometheus' text exposition format (version 0.0.4)."""
    series: dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]] = {
        "duplex_replica_up": ("gauge", "1 if the replica answered its status call", []),
        "duplex_sessions": ("gauge", "open sessions", []),
        "duplex_max_sessions": ("gauge", "sessions the replica accepts at once", []),
        "duplex_sessions_closed_total": ("counter", "sessions closed since the replica started", []),
        "duplex_session_voice_to_voice_seconds": (
            "gauge", "each open session's latest voice-to-voice latency (end of speech to the agent's voice)", []),
        "duplex_gpu_memory_allocated_bytes": ("gauge", "GPU memory the replica's tensors hold", []),
    }

    def add(name: str, labels: dict[str, str], value: float | int | None) -> None:
        if value is not None:
            series[name][2].append((labels, float(value)))

    for r in replicas:
        base = {"replica": r.replica}
        add("duplex_replica_up", base, 1 if r.up else 0)
        if not r.up:
            continue
        add("duplex_sessions", base, r.body.get("sessions"))
        add("duplex_max_sessions", base, r.body.get("max_sessions"))
        add("duplex_sessions_closed_total", base, r.body.get("closed_sessions"))
        for i, metrics in enumerate(r.body.get("session_metrics", [])):
            add("duplex_session_voice_to_voice_seconds", {**base, "session": str(i)}, metrics.get("voice_to_voice_s"))
        add("duplex_gpu_memory_allocated_bytes", base, (r.body.get("device") or {}).get("gpu_memory_allocated_bytes"))
    lines = []
    for name, (kind, help_text, samples) in series.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {value:g}")
    return "\n".join(lines) + "\n"
