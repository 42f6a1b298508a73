"""What a front door over several agent processes decides: the cluster's ingress (Ray Serve replicas)
and ``duplex serve --workers N`` (worker processes) alike. No Ray here, so it is tested alone:

- a session's public id names the replica that owns it (``agent-1.<the replica's own id>``), so every
  follow-up of a session (candidates, renegotiation, restart) reaches its owner with no table to keep;
- a new session goes to the replica with the most free capacity (ties: the lowest name), never to one
  that is full, still loading or not answering;
- the status of every replica, summed, and the same figures in Prometheus' text format;
- :class:`Router`: the signalling requests routed by those rules, over whatever carries a call to a
  replica (a Ray handle, a worker's socket).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from duplex.transport.server import ApiResponse

log = logging.getLogger(__name__)

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


class ReplicaDown(Exception):
    """A replica did not answer a call: it died, is restarting, or its connection is gone."""


# Carries one call to a replica: (replica, method, arguments) -> its answer. The methods are those of
# a cluster replica and a serve worker: offer(body, authorization, remote), candidates(body,
# authorization), capacity(session) and status(authorization). Raises ReplicaDown when the replica
# cannot answer, anything else when the call failed inside it.
Call = Callable[[str, str, tuple[Any, ...]], Awaitable[Any]]


class Router:
    """The signalling API of several agent processes behind one address: a new session to the replica
    with the most room, every follow-up to the replica its id names, the status summed."""

    def __init__(self, names: list[str], call: Call, *, call_timeout_s: float = 25.0,
                 status_timeout_s: float = 2.0) -> None:
        self.names = names
        self._call_replica = call
        self.call_timeout_s = call_timeout_s  # a signalling call (an offer takes well under a second)
        self.status_timeout_s = status_timeout_s  # a capacity or status question; slower counts as down
        self._placing: Counter[str] = Counter()  # new sessions sent to each replica, not answered yet

    async def signal(self, method: str, body: bytes, authorization: str | None, remote: str | None) -> ApiResponse:
        """POST (``offer``) or PATCH (``candidates``) /api/offer, checked for size and token already.

        Before a follow-up is sent on, its owner is asked (the short capacity question) whether it is up
        and still holds the session: a call to a dead replica could wait for its replacement, while a
        page whose connection went quiet asks exactly this and must hear in seconds, before its
        browser's own checks give up. A dead owner is a 503 and one loading again after its restart a
        404. An offer naming a connection that is no longer open starts a new session, as on a single
        server, placed like any other."""
        from duplex.transport.server import ApiResponse, not_open
        from duplex.transport.signalling import BadRequest, parse_json

        try:
            request = parse_json(body)
        except BadRequest as exc:
            return ApiResponse(400, {"error": str(exc)})
        session = request.get("pc_id")
        if not isinstance(session, str) and (session is not None or method == "PATCH"):
            return ApiResponse(400, {"error": "'pc_id' must be the id from this connection's answer (a string)"})
        owner = owner_of(session, self.names) if session is not None else None
        if owner is None and method == "PATCH":
            return not_open(session)
        if owner is not None:
            replica, local = owner
            capacity, = await self.capacities([replica], session=local)
            if not capacity.up:
                return _not_answering(replica)
            if not capacity.ready:
                return ApiResponse(404, {"error": f"replica {replica} has restarted and holds none of its "
                                                  "earlier sessions; post a new offer"})
            if capacity.holds or method == "PATCH":
                forwarded = json.dumps({**request, "pc_id": local}).encode()
                args = (forwarded, authorization, remote) if method == "POST" else (forwarded, authorization)
                return _public(replica, await self._call(replica, "offer" if method == "POST" else "candidates", args))
        if session is not None:
            request = {k: v for k, v in request.items() if k not in ("pc_id", "secret", "restart_pc")}
            body = json.dumps(request).encode()
        return await self._new_session(request, body, authorization, remote)

    async def _new_session(self, request: dict[str, Any], body: bytes, authorization: str | None,
                           remote: str | None) -> ApiResponse:
        """Place a new session (``request``, parsed, and its ``body`` as it goes to a replica)."""
        from duplex.transport.server import ApiResponse

        capacities = await self.capacities()
        for c in capacities:  # offers on their way to a replica take a seat there already
            c.free -= self._placing[c.replica]
        order = placement(capacities)
        token = request.get("resume")
        resumed = owner_of(token, self.names) if isinstance(token, str) else None
        if resumed is not None:  # only the replica that issued a resume token holds its conversation
            replica, local = resumed
            body = json.dumps({**request, "resume": local}).encode()
            if replica in order:
                order.remove(replica)
                order.insert(0, replica)
        if not order:
            return ApiResponse(503, {"error": f"all {len(self.names)} replicas are full or starting; try again "
                                              "later"}, {"Retry-After": "10"})
        answer = ApiResponse(503, {"error": "no replica took the session"}, {"Retry-After": "10"})
        for replica in order:  # a replica that filled up since it was asked says 503: try the next
            self._placing[replica] += 1
            try:
                answer = await self._call(replica, "offer", (body, authorization, remote))
            finally:
                self._placing[replica] -= 1
            if answer.status != 503:
                return _public(replica, answer)
        return answer

    async def capacities(self, names: list[str] | None = None, session: str | None = None) -> list[Capacity]:
        """Each replica's room (of ``names``, default all), asked with a short timeout: one that does not
        answer in time counts as down. Also whether it holds ``session``."""
        async def ask(name: str) -> Capacity:
            try:
                c = await asyncio.wait_for(self._call_replica(name, "capacity", (session,)), self.status_timeout_s)
            except Exception:
                return Capacity(name, up=False)
            return Capacity(name, up=True, ready=bool(c["ready"]), free=int(c["free"]), holds=bool(c["holds"]))

        return list(await asyncio.gather(*(ask(n) for n in (self.names if names is None else names))))

    async def statuses(self, authorization: str | None) -> list[ReplicaStatus]:
        """Each replica's own status (see Server.status_body); one that does not answer in time is down."""
        async def ask(name: str) -> ReplicaStatus:
            try:
                body = await asyncio.wait_for(self._call_replica(name, "status", (authorization,)),
                                              self.status_timeout_s)
            except Exception:
                return ReplicaStatus(name, up=False)
            return ReplicaStatus(name, up=True, body=body)

        return list(await asyncio.gather(*(ask(n) for n in self.names)))

    async def _call(self, replica: str, method: str, args: tuple[Any, ...]) -> ApiResponse:
        """A signalling call's answer; 503 if the replica is down or does not answer in time (its sessions
        are gone), 500 if the call failed inside it (its log has the traceback)."""
        from duplex.transport.server import ApiResponse

        try:
            return await asyncio.wait_for(self._call_replica(replica, method, args), self.call_timeout_s)
        except (ReplicaDown, asyncio.TimeoutError) as exc:
            log.warning("replica %s did not answer: %s", replica, exc or type(exc).__name__)
            return _not_answering(replica)
        except Exception as exc:
            log.error("replica %s failed a signalling call: %s", replica, exc)
            return ApiResponse(500, {"error": f"replica {replica} failed this request; see its log"})


def _public(replica: str, answer: ApiResponse) -> ApiResponse:
    """The replica's answer with the ids the page must use from now on (its connection's, and the
    token that resumes its conversation: both lead back to the replica)."""
    if answer.status == 200 and "pc_id" in answer.body:
        body = {**answer.body, "pc_id": public_id(replica, answer.body["pc_id"])}
        if isinstance(body.get("resume_token"), str):
            body["resume_token"] = public_id(replica, body["resume_token"])
        return replace(answer, body=body)
    return answer


def _not_answering(replica: str) -> ApiResponse:
    from duplex.transport.server import ApiResponse

    return ApiResponse(503, {"error": f"replica {replica} is not answering (restarting?); sessions it held "
                                      "have ended: connect again"}, {"Retry-After": "5"})
