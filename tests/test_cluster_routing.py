"""The cluster ingress's decisions, without Ray: where a new session goes, which replica a follow-up
belongs to, the summed status and the Prometheus text."""

from __future__ import annotations

import json
import sys

import pytest

from duplex.cluster.app import ClusterOptions
from duplex.cluster.launch import start
from duplex.cluster.routing import (Capacity, ReplicaStatus, cluster_status, owner_of, placement, prometheus,
                                    public_id)
from duplex.config import AgentConfig
from duplex.errors import ConfigError, DependencyError


def test_a_new_session_goes_to_the_replica_with_most_room():
    """Most free capacity first (not round robin), ties to the lowest name; a full, loading or silent
    replica is never tried; no candidate at all when every replica is full."""
    caps = [Capacity("agent-0", up=True, ready=True, free=1), Capacity("agent-1", up=True, ready=True, free=3),
            Capacity("agent-2", up=True, ready=True, free=3), Capacity("agent-3", up=True, ready=False, free=4),
            Capacity("agent-4", up=False), Capacity("agent-5", up=True, ready=True, free=0)]
    assert placement(caps) == ["agent-1", "agent-2", "agent-0"]
    assert placement([Capacity("agent-0", up=True, ready=True, free=0), Capacity("agent-1", up=False)]) == []


def test_a_public_id_names_its_owner():
    """The id a page holds leads back to the replica and its own id; ids of no replica of ours (or
    malformed) lead nowhere."""
    names = ["agent-0", "agent-1"]
    sid = public_id("agent-1", "pc_abc")
    assert owner_of(sid, names) == ("agent-1", "pc_abc")
    for bad in ("pc_abc", "agent-7.pc_abc", "agent-1.", ".pc_abc", ""):
        assert owner_of(bad, names) is None, bad


def test_status_sums_the_replicas_that_answered():
    """Totals over replicas that answered; each replica listed with its sessions; operator ids are the
    public ones."""
    body = cluster_status([
        ReplicaStatus("agent-0", True, {"sessions": 2, "max_sessions": 4, "peers": {"pc_1": {"state": "speaking"}}}),
        ReplicaStatus("agent-1", False)])
    assert body["sessions"] == 2 and body["max_sessions"] == 4 and body["replicas_up"] == 1
    assert [r["name"] for r in body["replicas"]] == ["agent-0", "agent-1"]
    assert body["replicas"][0]["sessions"] == 2 and body["replicas"][1] == {"name": "agent-1", "up": False}
    assert list(body["replicas"][0]["peers"]) == ["agent-0.pc_1"]


def test_metrics_are_prometheus_text():
    """Every series has HELP and TYPE lines; samples carry the replica label; a down replica reports
    up 0 and nothing else; per-session latency is labelled by session index, not by id."""
    text = prometheus([
        ReplicaStatus("agent-0", True, {"sessions": 1, "max_sessions": 4, "closed_sessions": 3,
                                        "session_metrics": [{"voice_to_voice_s": 0.42}],
                                        "device": {"kind": "cuda", "gpu_memory_allocated_bytes": 1024}}),
        ReplicaStatus("agent-1", False)])
    lines = text.splitlines()
    assert 'duplex_replica_up{replica="agent-0"} 1' in lines and 'duplex_replica_up{replica="agent-1"} 0' in lines
    assert 'duplex_sessions{replica="agent-0"} 1' in lines
    assert 'duplex_session_voice_to_voice_seconds{replica="agent-0",session="0"} 0.42' in lines
    assert 'duplex_gpu_memory_allocated_bytes{replica="agent-0"} 1024' in lines
    assert not any('replica="agent-1"' in line and not line.startswith("duplex_replica_up") for line in lines)
    names = {line.split("{")[0] for line in lines if not line.startswith("#")}
    for name in names:
        assert f"# TYPE {name} gauge" in lines or f"# TYPE {name} counter" in lines


def test_without_ray_the_cluster_names_its_extra(monkeypatch):
    """`duplex serve --replicas N` without Ray installed refuses with the pip extra to install."""
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DependencyError, match=r"\.\[cluster\]"):
        start(AgentConfig(profile="fake"), ClusterOptions(replicas=2))


def test_a_bad_replica_count_is_refused_before_ray_starts():
    """--replicas 0 is a configuration error naming the option, raised before any Ray process starts."""
    ray = pytest.importorskip("ray")
    with pytest.raises(ConfigError, match="--replicas must be at least 1"):
        start(AgentConfig(profile="fake"), ClusterOptions(replicas=0))
    assert not ray.is_initialized()


def _ingress_call(ingress, method: str, path: str, chunks: list[bytes], headers: dict[str, str]) -> tuple[int, dict, int]:
    """Send one ASGI request to ``ingress`` (as Serve does): (status, JSON body, body chunks it read)."""
    import asyncio
    import json

    from starlette.requests import Request

    read = 0

    async def receive():
        nonlocal read
        read += 1
        chunk = chunks[read - 1] if read <= len(chunks) else b""
        return {"type": "http.request", "body": chunk, "more_body": read < len(chunks)}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "client": ("192.0.2.1", 5000),
             "headers": [(k.lower().encode(), v.encode())
                         for k, v in {"Content-Type": "application/json", **headers}.items()]}
    response = asyncio.run(ingress(Request(scope, receive)))
    return response.status_code, json.loads(response.body), read


class _NoReplica:
    """A replica handle that must not be reached: these requests are refused at the ingress."""

    def __getattr__(self, name):
        raise AssertionError(f"the ingress routed a refused request to a replica ({name})")


def test_the_ingress_refuses_before_it_routes():
    """As a single server does, the ingress checks the size and the token before it parses or routes:
    a body declared over the cap is a 413 before any of it is read, and one sent without a length is
    cut off once it passes the cap. Without the token, a follow-up naming any replica is a 401, not a
    404 or 503 that would tell a stranger about the cluster. An integer with too many digits is a 400.
    The Realtime WebSocket, not served through replicas, says so."""
    pytest.importorskip("starlette", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    from duplex.cluster.app import Ingress
    from duplex.transport.server import ServerOptions

    options = ClusterOptions(replicas=2, server=ServerOptions(max_body=1000, token="t0ken"))
    ingress = Ingress(options, _NoReplica(), _NoReplica())
    auth = {"Authorization": "Bearer t0ken"}
    status, body, read = _ingress_call(ingress, "POST", "/api/offer", [b"x" * 10] * 100,
                                       {"Content-Length": "5000", **auth})
    assert status == 413 and "too large" in body["error"] and read == 0
    status, body, read = _ingress_call(ingress, "POST", "/api/offer", [b"x" * 400] * 50, auth)
    assert status == 413 and read == 3  # stopped at the chunk that passed the cap
    for headers in ({}, {"Authorization": "Bearer nope"}):
        status, body, _ = _ingress_call(ingress, "PATCH", "/api/offer",
                                        [b'{"pc_id": "agent-9.pc_0011223344556677", "candidates": []}'], headers)
        assert status == 401 and "?token=" in body["error"]
    roomy = Ingress(ClusterOptions(replicas=2, server=ServerOptions(token="t0ken")), _NoReplica(), _NoReplica())
    status, body, _ = _ingress_call(roomy, "POST", "/api/offer", [b'{"pc_id": ' + b"1" * 5000 + b"}"], auth)
    assert status == 400 and "JSON" in body["error"]
    status, body, _ = _ingress_call(roomy, "GET", "/v1/realtime", [b""], auth)  # said, not a bare 404
    assert status == 501 and "--workers" in body["error"]


class _Replica:
    """A replica handle as the ingress sees it: ``capacity`` answers as given (or never), holding the
    sessions in ``holds``; the signalling calls it receives are recorded (name, the JSON body) and
    answered 200 with a new connection id."""

    def __init__(self, capacity: dict | None, holds: tuple[str, ...] = ()):
        self._capacity, self._holds, self.calls = capacity, holds, []

    def __getattr__(self, name):
        import asyncio
        import json
        from types import SimpleNamespace

        from duplex.transport.server import ApiResponse

        async def remote(*args):
            if name == "capacity":
                if self._capacity is None:
                    await asyncio.sleep(3600)  # dead, or queued until Ray has replaced it
                return {**self._capacity, "holds": args[0] in self._holds}
            self.calls.append((name, json.loads(args[0])))
            return ApiResponse(200, {"pc_id": "pc_new"})
        return SimpleNamespace(remote=remote)


def test_a_follow_up_reaches_its_owner_only_while_it_holds_the_session(monkeypatch):
    """A page whose connection went quiet asks the ingress whether its session still exists. When
    the replica holding it is dead (its calls would wait for Ray to replace it) the answer is a 503
    within the capacity question's timeout; when it is back but loading again, a 404 saying its
    sessions ended; neither is sent the follow-up. A replica that is up gets it, with its own id. An
    offer naming a connection that has ended starts a new session, as on a single server, placed on
    the replica with the most room rather than the one it names."""
    pytest.importorskip("starlette", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    import time

    from duplex.cluster import app

    monkeypatch.setattr(app, "STATUS_TIMEOUT_S", 0.2)
    dead, loading = _Replica(None), _Replica({"ready": False, "free": 0})
    owner, roomy = _Replica({"ready": True, "free": 1}, holds=("pc_a",)), _Replica({"ready": True, "free": 3})
    ingress = app.Ingress(ClusterOptions(replicas=4), dead, loading, owner, roomy)

    def patch(pc_id: str) -> tuple[int, dict]:
        body = json.dumps({"pc_id": pc_id, "secret": "s", "candidates": []}).encode()
        status, answer, _ = _ingress_call(ingress, "PATCH", "/api/offer", [body], {})
        return status, answer

    started = time.monotonic()
    status, body = patch("agent-0.pc_a")
    assert status == 503 and "agent-0 is not answering" in body["error"] and "connect again" in body["error"]
    assert time.monotonic() - started < 5
    status, body = patch("agent-1.pc_a")
    assert status == 404 and "agent-1 has restarted" in body["error"]
    assert patch("agent-2.pc_a")[0] == 200
    assert (dead.calls, loading.calls) == ([], [])
    assert owner.calls == [("candidates", {"pc_id": "pc_a", "secret": "s", "candidates": []})]

    offer = {"sdp": "v=0", "type": "offer", "secret": "s", "restart_pc": True}
    for named, to, sent in (("agent-2.pc_a", owner, {**offer, "pc_id": "pc_a"}),  # open: renegotiated
                            ("agent-2.pc_gone", roomy, {"sdp": "v=0", "type": "offer"}),  # ended: placed anew
                            ("agent-7.pc_a", roomy, {"sdp": "v=0", "type": "offer"})):  # no such replica
        status, body, _ = _ingress_call(ingress, "POST", "/api/offer", [json.dumps({**offer, "pc_id": named}).encode()],
                                        {})
        assert status == 200 and to.calls[-1] == ("offer", sent)
        assert body["pc_id"] == ("agent-2" if to is owner else "agent-3") + ".pc_new"


async def test_a_resume_token_leads_back_to_the_replica_that_issued_it():
    """The token in an answer names its replica (as the connection id does); an offer that presents it
    goes to that replica with the replica's own token, though another has more room; if that replica
    is full, the offer goes elsewhere and is answered there (a new conversation, the refusal said)."""
    from duplex.cluster.routing import Router
    from duplex.transport.server import ApiResponse

    free = {"agent-0": 5, "agent-1": 1}
    offers: list[tuple[str, dict]] = []

    async def call(name: str, method: str, args: tuple) -> object:
        if method == "capacity":
            return {"ready": True, "free": free[name], "holds": False}
        assert method == "offer"
        request = json.loads(args[0])
        offers.append((name, request))
        return ApiResponse(200, {"pc_id": "pc_1", "resume_token": f"tok-{name}",
                                 "resumed": request.get("resume") == f"tok-{name}"})

    router = Router(["agent-0", "agent-1"], call)
    first = await router.signal("POST", json.dumps({"sdp": "x", "type": "offer"}).encode(), None, None)
    assert first.body["resume_token"] == "agent-0.tok-agent-0"  # most room first
    token = first.body["resume_token"].replace("agent-0", "agent-1")  # as if agent-1 had issued it
    again = await router.signal("POST", json.dumps({"sdp": "x", "type": "offer", "resume": token}).encode(), None, None)
    assert offers[-1] == ("agent-1", {"sdp": "x", "type": "offer", "resume": "tok-agent-1"})
    assert again.body["resumed"] and again.body["pc_id"] == "agent-1.pc_1"
    free["agent-1"] = 0
    await router.signal("POST", json.dumps({"sdp": "x", "type": "offer", "resume": token}).encode(), None, None)
    assert offers[-1] == ("agent-0", {"sdp": "x", "type": "offer", "resume": "tok-agent-1"})
