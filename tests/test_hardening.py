"""Hostile input against a real server (the fake profile) and the cluster's ingress: what a web page,
a stranger on the network or a broken client sends must be refused with a 4xx JSON answer, and must
neither reach the agent nor stall or crash the server.

Each test sends what an attacker would (curl-equivalent requests with aiohttp's client or raw sockets)
and checks the answer and what it left behind.
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from duplex.cluster.app import ClusterOptions
from duplex.transport.server import ServerOptions
from tests.transport_fixtures import load_agent, running_server

JSON = {"Content-Type": "application/json"}
OFFER = {"sdp": "v=0\r\nm=audio 9 x 0\r\n", "type": "offer"}  # passes the guards, refused by the parser: 400


async def _request(method: str, url: str, body: bytes | None = None, headers: dict | None = None
                   ) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers) of one request; ``headers`` may override Host."""
    async with aiohttp.ClientSession() as http, http.request(method, url, data=body, headers=headers or {}) as r:
        reply = await r.json(content_type=None) if r.content_type == "application/json" else {}
        return r.status, reply, dict(r.headers)


# -- 1. no web page can use or block a local agent ----------------------------------------------------


async def test_a_loopback_server_answers_only_requests_naming_this_machine():
    """DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1 sends Host
    evil.example; every route refuses it with a 403 JSON naming --allowed-host, the status included.
    localhost, IP addresses and the names given with --allowed-host are served."""
    agent = await load_agent()
    try:
        async with running_server(agent, allowed_hosts=("Box.lan",)) as (server, url):
            port = url.rsplit(":", 1)[1]
            for path in ("/api/status", "/", "/app.js"):
                status, reply, _ = await _request("GET", url + path, headers={"Host": f"evil.example:{port}"})
                assert status == 403 and "--allowed-host" in reply["error"], (path, status, reply)
            status, reply, _ = await _request("POST", url + "/api/offer", json.dumps(OFFER).encode(),
                                              {**JSON, "Host": "evil.example", "Origin": "http://evil.example"})
            assert status == 403 and not server.peers
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "box.lan", f"app.localhost:{port}"):
                status, reply, _ = await _request("GET", url + "/api/status", headers={"Host": host})
                assert status == 200 and reply["sessions"] == 0, (host, status, reply)
        async with running_server(agent, loopback_bind=False) as (_, url):  # bound for others: any name
            status, _, _ = await _request("GET", url + "/api/status", headers={"Host": "agent.example.com"})
            assert status == 200
    finally:
        await agent.aclose()


async def test_other_sites_pages_cannot_post_offers_or_candidates():
    """A cross-site fetch (Origin of another site) is a 403 for POST and PATCH; a text/plain body (the
    kind a page sends without a preflight, mode no-cors) is a 415; the page's own origin and an
    --allowed-origin pass the guards (here to the SDP parser's 400). No CORS headers by default; an
    allowed origin gets them and its preflight a 204."""
    agent = await load_agent()
    try:
        async with running_server(agent, allowed_origins=("https://app.example",)) as (server, url):
            offer = json.dumps(OFFER).encode()
            for method in ("POST", "PATCH"):
                for origin in ("http://evil.example", "null", f"{url.replace('127.0.0.1', 'localhost')}"):
                    status, reply, headers = await _request(method, url + "/api/offer", offer,
                                                            {**JSON, "Origin": origin})
                    assert status == 403 and "--allowed-origin" in reply["error"], (method, origin, status)
                    assert "Access-Control-Allow-Origin" not in headers
                for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
                    status, reply, _ = await _request(method, url + "/api/offer", offer,
                                                      {"Content-Type": content_type} if content_type else {})
                    assert status == 415 and "application/json" in reply["error"], (method, content_type, status)
            status, reply, headers = await _request("POST", url + "/api/offer", offer, {**JSON, "Origin": url})
            assert status == 400 and "Access-Control-Allow-Origin" not in headers
            status, reply, headers = await _request("POST", url + "/api/offer", offer,
                                                    {"Content-Type": "application/json; charset=utf-8",
                                                     "Origin": "https://app.example"})
            assert status == 400 and headers["Access-Control-Allow-Origin"] == "https://app.example"
            status, _, headers = await _request("OPTIONS", url + "/api/offer", None,
                                                {"Origin": "https://app.example",
                                                 "Access-Control-Request-Method": "POST"})
            assert status == 204 and "Content-Type" in headers["Access-Control-Allow-Headers"]
            status, reply, headers = await _request("OPTIONS", url + "/api/offer", None,
                                                    {"Origin": "http://evil.example"})
            assert status == 405 and reply["error"] and "Access-Control-Allow-Origin" not in headers
            assert not server.peers and not agent.sessions
    finally:
        await agent.aclose()


def _ingress(server: ServerOptions):
    pytest.importorskip("starlette", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    from duplex.cluster.app import Ingress

    class NoReplica:  # every request here must be refused before it is routed
        def __getattr__(self, name):
            raise AssertionError(f"the ingress routed a refused request to a replica ({name})")

    return Ingress(ClusterOptions(replicas=2, server=server), NoReplica(), NoReplica())


def _ingress_call(ingress, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    """One ASGI request to ``ingress`` as Serve's proxy hands it over: (status, JSON body, headers)."""
    import asyncio

    from starlette.requests import Request

    sent = False

    async def receive():
        nonlocal sent
        chunk, sent = (b"" if sent else body), True
        return {"type": "http.request", "body": chunk, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "client": ("192.0.2.1", 5000),
             "scheme": "http", "server": ("127.0.0.1", 8080),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    response = asyncio.run(ingress(Request(scope, receive)))
    return response.status_code, json.loads(response.body or b"{}"), dict(response.headers)


def test_the_ingress_refuses_foreign_hosts_origins_and_content_types():
    """The cluster's ingress runs the same checks before it routes anything: a foreign Host on a
    loopback bind (403), a foreign Origin (403), a body that is not JSON-typed (415); an allowed origin
    gets CORS headers and its preflight a 204."""
    ingress = _ingress(ServerOptions(allowed_origins=("https://app.example",)))
    body = json.dumps(OFFER).encode()
    status, reply, _ = _ingress_call(ingress, "GET", "/api/status", b"", {"Host": "evil.example:8080"})
    assert status == 403 and "--allowed-host" in reply["error"]
    status, reply, _ = _ingress_call(ingress, "POST", "/api/offer", body,
                                     {**JSON, "Host": "127.0.0.1:8080", "Origin": "http://evil.example"})
    assert status == 403 and "--allowed-origin" in reply["error"]
    status, reply, _ = _ingress_call(ingress, "PATCH", "/api/offer", body,
                                     {"Host": "127.0.0.1:8080", "Content-Type": "text/plain"})
    assert status == 415
    status, _, headers = _ingress_call(ingress, "OPTIONS", "/api/offer", b"",
                                       {"Host": "127.0.0.1:8080", "Origin": "https://app.example"})
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    open_ingress = _ingress(ServerOptions(loopback_bind=False, token="t0ken"))
    status, reply, _ = _ingress_call(open_ingress, "POST", "/api/offer", body,
                                     {**JSON, "Host": "agent.example.com", "Origin": "http://agent.example.com"})
    assert status == 401  # past the guards: the page's own origin, any Host on an open bind
