"""Hostile input against a real server (the fake profile) and the cluster's ingress: what a web page,
a stranger on the network or a broken client sends must be refused with a 4xx JSON answer, and must
neither reach the agent nor stall or crash the server.

Each test sends what an attacker would (curl-equivalent requests with aiohttp's client or raw sockets)
and checks the answer and what it left behind.
"""

from __future__ import annotations

import contextlib
import json

import aiohttp
import pytest

from duplex.cluster.app import ClusterOptions
from duplex.transport.server import NOT_CONNECTED, ServerOptions
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
             "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]}
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


# -- 4. no input reaches a 500 -------------------------------------------------------------------------


async def _raw(url: str, data: bytes, *, leave: bool = False, timeout: float = 5.0) -> tuple[int, dict]:
    """Send ``data`` on a raw connection to the server at ``url``: (status, JSON body) of its answer,
    or (0, {}) with ``leave`` (the client hangs up right after sending)."""
    import asyncio

    host, port = url.rsplit("/", 1)[-1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        if leave:
            return 0, {}
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
        return status, json.loads(body) if body.startswith(b"{") else {"_raw": body.decode(errors="replace")}
    finally:
        writer.close()


def _http(method: str, headers: dict[str, str | bytes], body: bytes = b"") -> bytes:
    lines = [f"{method} /api/offer HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    lines += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _no_tracebacks(caplog) -> None:
    bad = [r for r in caplog.records if r.levelno >= 40 or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


async def test_bad_headers_and_bodies_are_4xx_not_500(caplog, jfk_path, monkeypatch):
    """What reached a 500 before: an Authorization header that is not UTF-8 (with --token), a body
    whose Content-Encoding does not decode, a client that leaves mid-body, and a 'secret' that is a
    lone surrogate. Each is now a 4xx JSON answer (the client that left gets none; an offer with such
    a secret is a new session, as any offer not holding the connection's secret) and leaves no ERROR
    or traceback in the log; the server goes on serving."""
    import asyncio
    import logging

    from duplex.transport import server as server_module
    from tests.transport_fixtures import connect, file_track, jfk48

    caplog.set_level(logging.INFO)
    # the lost-client line is rate-limited per process: an earlier test's lost client must not hide this one's
    monkeypatch.setattr(server_module._gone, "_last", -float("inf"))
    agent = await load_agent()
    try:
        async with running_server(agent, token="t0ken") as (server, url):
            body = json.dumps(OFFER).encode()
            status, reply = await _raw(url, _http("POST", {"Authorization": b"Bearer \xff\xfe\xc3", **JSON,
                                                            "Content-Length": str(len(body))}, body))
            assert status == 401 and "token" in reply["error"]
            auth = {"Authorization": "Bearer t0ken", **JSON}
            status, reply = await _raw(url, _http("POST", {**auth, "Content-Encoding": "gzip",
                                                           "Content-Length": "9"}, b"not gzip!"))
            assert status == 400 and "cannot read the request body" in reply["error"]
            await _raw(url, _http("POST", {**auth, "Content-Length": "1000"}, b'{"sdp": "v=0'), leave=True)
            for _ in range(50):
                if any("left before sending its whole body" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.1)
            assert any("left before sending its whole body" in r.getMessage() for r in caplog.records)

            client = await connect(url, file_track(jfk48(jfk_path)), token="t0ken")
            try:
                request = {"pc_id": client.pc_id, "secret": "\udcff", "candidates": []}
                status, reply, _ = await _request("PATCH", url + "/api/offer", json.dumps(request).encode(), auth)
                assert status == 404 and "no open connection" in reply["error"], (status, reply)
                request = {"sdp": client.pc.localDescription.sdp, "type": "offer", "pc_id": client.pc_id,
                           "secret": "\ud800x"}
                status, reply, _ = await _request("POST", url + "/api/offer", json.dumps(request).encode(), auth)
                assert status == 200 and reply["pc_id"] != client.pc_id  # a session of its own
                await server.peers[reply["pc_id"]].close("test")
                status, reply, _ = await _request("GET", url + "/api/status", headers=auth)
                assert status == 200 and reply["sessions"] == 1
            finally:
                await client.close()
    finally:
        await agent.aclose()
    _no_tracebacks(caplog)


async def test_aiortc_failing_in_its_own_task_is_one_warning(caplog):
    """aiortc runs parts of a connection in tasks nobody awaits; one failing on what a peer sent was
    asyncio's "Task exception was never retrieved" ERROR with a traceback (it was an offer without
    a=fingerprint, now refused up front). While the server runs, such a failure is one WARNING line;
    a failing task of anyone else still reaches the loop's handler, which is the test's own again
    after the server."""
    import asyncio
    import gc
    import logging

    from aiortc import RTCIceCandidate, RTCPeerConnection

    from duplex.transport import server as server_module

    caplog.set_level(logging.INFO)
    server_module._webrtc_failed._last = -float("inf")  # whatever an earlier test logged
    loop = asyncio.get_running_loop()
    others: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: others.append(context))
    agent = await load_agent()
    pc = RTCPeerConnection()

    async def not_aiortc() -> None:
        raise RuntimeError("someone else's bug")

    try:
        async with running_server(agent):
            candidate = RTCIceCandidate(component=1, foundation="1", ip="192.0.2.1", port=5, priority=1,
                                        protocol="udp", type="host")  # no sdpMid: aiortc raises ValueError
            for coro in (pc.addIceCandidate(candidate), pc.addIceCandidate(candidate), not_aiortc()):
                task = loop.create_task(coro)
                await asyncio.wait([task])
                del task  # dropped with its exception unretrieved
                gc.collect()
            warnings = [r for r in caplog.records if "failed inside aiortc" in r.getMessage()]
            assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # the second one rate-limited
            assert "ValueError" in warnings[0].getMessage()
            assert [str(c.get("exception")) for c in others] == ["someone else's bug"]
        assert loop.get_exception_handler() is not None and loop.get_exception_handler().__name__ == "<lambda>"
    finally:
        loop.set_exception_handler(None)
        await pc.close()
        await agent.aclose()
    _no_tracebacks(caplog)


def test_the_ingress_answers_a_client_that_left_mid_body_without_a_500():
    """A client that hangs up mid-body at the ingress is a 400 (logged as one line), not a 500 with a
    traceback; an Authorization that is not UTF-8 is a 401."""
    ingress = _ingress(ServerOptions(token="t0ken"))
    from starlette.requests import Request

    async def left():
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/api/offer", "query_string": b"", "scheme": "http",
             "client": ("192.0.2.1", 5000), "server": ("127.0.0.1", 8080),
             "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                         (b"authorization", b"Bearer t0ken")]}
    import asyncio

    response = asyncio.run(ingress(Request(scope, left)))
    assert response.status_code == 400 and b"cut short" in response.body
    status, reply, _ = _ingress_call(ingress, "POST", "/api/offer", json.dumps(OFFER).encode(),
                                     {**JSON, "Host": "127.0.0.1:8080", "Authorization": "Bearer \xff\xfe"})  # as bytes
    assert status == 401


# -- 6. small leaks --------------------------------------------------------------------------------------


def _strip_id(reply: dict, pc_id: str) -> str:
    return reply["error"].replace(pc_id, "<id>")


async def test_status_needs_the_token_and_a_live_id_answers_as_an_unknown_one(jfk_path):
    """With --token the status is a 401 without it (the admin token also opens it); candidates for a
    live connection without its secret get exactly the answer of an unknown id (404, same message),
    and an offer naming a live connection without its secret gets a new session, as one naming an
    unknown id does; the owner's session is untouched. Every answer carries the security headers."""
    from tests.transport_fixtures import connect, file_track, jfk48

    agent = await load_agent()
    try:
        async with running_server(agent, token="t0ken", admin_token="op") as (server, url):
            status, reply, headers = await _request("GET", url + "/api/status")
            assert status == 401 and "token" in reply["error"] and headers["WWW-Authenticate"] == "Bearer"
            for token in ("t0ken", "op"):
                status, reply, _ = await _request("GET", url + "/api/status", headers={"Authorization": f"Bearer {token}"})
                assert status == 200 and ("peers" in reply) == (token == "op")
            auth = {"Authorization": "Bearer t0ken", **JSON}
            client = await connect(url, file_track(jfk48(jfk_path)), token="t0ken")
            try:
                unknown = "pc_0011223344556677"
                answers = []
                for pc_id in (client.pc_id, unknown):
                    for secret in (None, "guess"):
                        body = json.dumps({"pc_id": pc_id, "secret": secret, "candidates": []}).encode()
                        status, reply, _ = await _request("PATCH", url + "/api/offer", body, auth)
                        answers.append((status, _strip_id(reply, pc_id)))
                assert len(set(answers)) == 1 and answers[0][0] == 404, answers
                for pc_id in (client.pc_id, unknown):
                    body = json.dumps({"sdp": client.pc.localDescription.sdp, "type": "offer", "pc_id": pc_id,
                                       "restart_pc": True}).encode()
                    status, reply, _ = await _request("POST", url + "/api/offer", body, auth)
                    assert status == 200 and reply["pc_id"] not in (client.pc_id, unknown)
                    await server.peers[reply["pc_id"]].close("test")
                assert client.pc_id in server.peers and not server.peers[client.pc_id].closed
            finally:
                await client.close()
    finally:
        await agent.aclose()


async def test_every_answer_carries_the_security_headers():
    """The page, its files, the API, a 404 and a refused Host: no framing (CSP frame-ancestors 'none',
    X-Frame-Options), no type sniffing, no Referer carrying ?token= elsewhere."""
    agent = await load_agent()
    try:
        async with running_server(agent) as (_, url):
            for path, extra, code in (("/", {}, 200), ("/app.js", {}, 200), ("/api/status", {}, 200),
                                      ("/nothing.js", {}, 404), ("/api/status", {"Host": "evil.example"}, 403)):
                status, _, headers = await _request("GET", url + path, headers=extra)
                assert status == code, (path, status)
                assert headers["Content-Security-Policy"] == "frame-ancestors 'none'", path
                assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
                assert headers["Referrer-Policy"] == "no-referrer"
    finally:
        await agent.aclose()


def test_the_ingress_status_and_metrics_need_the_token_and_carry_the_headers():
    """At the ingress too: the status and the metrics are 401 without the token, before any replica
    is asked; a PATCH naming no replica of ours is the replicas' own 404; answers carry the headers."""
    ingress = _ingress(ServerOptions(token="t0ken"))
    host = {"Host": "127.0.0.1:8080"}
    for path in ("/api/status", "/metrics"):
        status, reply, headers = _ingress_call(ingress, "GET", path, b"", host)
        assert status == 401 and "token" in reply["error"], path
        assert headers["content-security-policy"] == "frame-ancestors 'none'"
        assert headers["x-content-type-options"] == "nosniff"
    body = json.dumps({"pc_id": "agent-9.pc_0011223344556677", "secret": "s", "candidates": []}).encode()
    status, reply, _ = _ingress_call(ingress, "PATCH", "/api/offer", body,
                                     {**host, **JSON, "Authorization": "Bearer t0ken"})
    from duplex.transport.server import not_open

    assert status == 404 and reply == not_open("agent-9.pc_0011223344556677").body


# -- 2. a few offers a minute cannot hold every seat ----------------------------------------------------


async def _real_offer(*, drop: str | None = None):
    """A real aiortc client's offer (audio and the events channel), its ``pc`` never given the answer:
    what a page that never completes ICE sends. ``drop``: leave out the lines starting with it."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    if drop:
        sdp = "".join(line for line in sdp.splitlines(keepends=True) if not line.startswith(drop))
    return pc, json.dumps({"sdp": sdp, "type": "offer"}).encode()


async def _post_from(url: str, body: bytes, source: str = "127.0.0.1") -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as http:
        async with http.post(url + "/api/offer", data=body, headers=JSON) as r:
            return r.status, await r.json(), dict(r.headers)


async def test_offers_that_can_never_connect_are_refused():
    """A real client's offer without a=fingerprint, a=ice-ufrag or a=ice-pwd was answered 200 and held
    a seat until a timeout (aiortc then failed in a task of its own); now it is a 400 naming the line."""
    agent = await load_agent()
    try:
        async with running_server(agent) as (server, url):
            for line in ("a=fingerprint", "a=ice-ufrag", "a=ice-pwd"):
                pc, body = await _real_offer(drop=line)
                try:
                    status, reply, _ = await _post_from(url, body)
                finally:
                    await pc.close()
                assert status == 400 and f"no {line} line" in reply["error"], (line, status, reply)
            assert not server.peers and not agent.sessions
    finally:
        await agent.aclose()


async def test_a_session_that_never_connects_is_closed_and_pending_ones_are_capped_per_address(jfk_path):
    """Offers whose page never completes ICE (real aiortc offers, the answer never applied): at most
    max_pending_per_address of them from one address at once (the next is a 429 JSON with
    Retry-After), while another address still gets in; each is closed connect_timeout_s after its
    answer, freeing its seat, and the address may offer again. A session that connects is neither
    closed nor counted."""
    import asyncio

    from tests.transport_fixtures import connect, file_track, jfk48

    agent = await load_agent()
    pcs = []
    try:
        async with running_server(agent, connect_timeout_s=1.5, max_pending_per_address=2, per_address_exempt=(),
                                  max_sessions=8) as (server, url):
            talking = await connect(url, file_track(jfk48(jfk_path)))
            await talking.wait_for("session.created", timeout=10)
            answers = []
            for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"):
                pc, body = await _real_offer()
                pcs.append(pc)
                answers.append(await _post_from(url, body, source))
            assert [a[0] for a in answers] == [200, 200, 429, 200], [a[:2] for a in answers]
            assert "still connecting" in answers[2][1]["error"] and answers[2][2]["Retry-After"]
            hanging = [a[1]["pc_id"] for a in answers if a[0] == 200]
            assert all(pc_id in server.peers for pc_id in hanging)
            for _ in range(100):  # closed 1.5 s after their answers (a generous deadline here)
                if not any(pc_id in server.peers for pc_id in hanging):
                    break
                await asyncio.sleep(0.1)
            assert not any(pc_id in server.peers for pc_id in hanging)
            assert server.close_reasons[NOT_CONNECTED] == 3, server.close_reasons
            assert talking.pc_id in server.peers and not server.peers[talking.pc_id].closed
            pc, body = await _real_offer()
            pcs.append(pc)
            assert (await _post_from(url, body))[0] == 200
            await talking.close()
    finally:
        for pc in pcs:
            await pc.close()
        await agent.aclose()


# -- 3 and 5. deadlines, connection caps, aiohttp's own refusals ------------------------------------------


@contextlib.asynccontextmanager
async def _served(site):
    """``site`` (a Server or a bare Site) on 127.0.0.1 through its own runner, as `duplex serve` runs it."""
    from aiohttp import web

    runner = site.runner(access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _open(url: str, source: str = "127.0.0.1"):
    import asyncio

    host, port = url.rsplit("/", 1)[-1].split(":")
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


async def _closed_within(reader, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails if it stays open ``seconds``."""
    import asyncio

    return await asyncio.wait_for(reader.read(), seconds)


async def test_stalled_headers_and_bodies_are_cut_off(monkeypatch):
    """A connection that sends nothing, or never finishes its headers, was kept for an hour (aiohttp's
    keep-alive default); one that sends its body a byte at a time, for as long as it liked. Now the
    headers must be in within the header deadline (closed otherwise) and a body within the body
    deadline (408 JSON, then closed); a prompt request on the same server is served meanwhile."""
    import asyncio

    from duplex.transport import server as server_module

    monkeypatch.setattr(server_module, "HEADER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(server_module, "BODY_TIMEOUT_S", 1.0)
    agent = await load_agent()
    try:
        async with _served(server_module.Server(agent)) as url:
            silent, _ = await _open(url)
            partial, partial_w = await _open(url)
            partial_w.write(b"POST /api/offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
            slow, slow_w = await _open(url)
            slow_w.write(_http("POST", {**JSON, "Content-Length": "100"}, b'{"sdp": '))

            async def dribble():
                for _ in range(40):
                    await asyncio.sleep(0.1)
                    slow_w.write(b" ")

            dribbling = asyncio.create_task(dribble())
            status, _, _ = await _request("GET", url + "/api/status")
            assert status == 200
            assert await _closed_within(silent, 5) == b""
            assert await _closed_within(partial, 5) == b""
            answer = await _closed_within(slow, 5)
            assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer[:200]
            dribbling.cancel()
            status, _, _ = await _request("GET", url + "/api/status")
            assert status == 200
    finally:
        await agent.aclose()


async def test_connections_per_address_are_capped():
    """More than max_connections_per_address open connections from one address: the next is answered
    429 JSON and closed at once; another address is served, and a closed connection frees its place."""
    from duplex.transport.server import Site

    site = Site(ServerOptions(max_connections_per_address=3, per_address_exempt=()))
    async with _served(site) as url:
        held = [await _open(url) for _ in range(3)]
        extra, _ = await _open(url)
        answer = await _closed_within(extra, 5)
        assert answer.startswith(b"HTTP/1.1 429") and b'"error"' in answer and b"too many connections" in answer
        other, other_w = await _open(url, "127.0.0.2")
        other_w.write(b"GET /app.js HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert (await _closed_within(other, 5)).startswith(b"HTTP/1.1 200")
        held[0][1].close()
        await held[0][1].wait_closed()
        import asyncio

        for _ in range(50):  # the server sees the close a moment later
            again, again_w = await _open(url)
            again_w.write(b"GET /app.js HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = await _closed_within(again, 5)
            if not answer.startswith(b"HTTP/1.1 429"):
                break
            await asyncio.sleep(0.1)
        assert answer.startswith(b"HTTP/1.1 200")
        for _, writer in held[1:]:
            writer.close()


async def test_malformed_requests_are_json_400s_and_one_log_line(caplog):
    """What aiohttp refuses itself (not HTTP at all, a broken header, an overlong header line, a bad
    Content-Length) was a plain-text 400 and a ~10-line ERROR traceback each; now each is a JSON 400
    with the security headers, and 40 of them leave one log line, no traceback."""
    import logging

    from duplex.transport.server import Site

    caplog.set_level(logging.DEBUG)
    bad = [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n",
           b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
           b"POST /api/offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n"]
    async with _served(Site(ServerOptions())) as url:
        for i in range(40):
            reader, writer = await _open(url)
            writer.write(bad[i % len(bad)])
            answer = await _closed_within(reader, 5)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400" and b"application/json" in head, answer[:300]
            assert b"X-Content-Type-Options: nosniff" in head
            assert json.loads(body)["error"].startswith("malformed HTTP request"), body
    lines = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


CHILD = """
import asyncio, resource, sys
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
import logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from aiohttp import web
from duplex.transport import connections, server
server.HEADER_TIMEOUT_S = 1.0
async def main():
    site = server.Site(server.ServerOptions())
    runner = site.runner(access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    print("PORT", runner.addresses[0][1], "NOFILE", resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
    await asyncio.sleep(30)
asyncio.run(main())
"""


async def test_the_file_limit_is_raised_and_running_out_of_files_is_one_line(tmp_path):
    """In a child process: a soft RLIMIT_NOFILE under the hard one is raised to it at start. With the
    hard limit itself tiny (64 files), 150 idle connections run the server out of files: asyncio's
    accept errors (a traceback each, 132,459 of them in 27 s in the issue) are one WARNING line,
    and once the header deadline has closed the idle connections the server answers again."""
    import asyncio
    import resource
    import subprocess
    import sys

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    async def start(soft: int, hard: int):
        child = await asyncio.create_subprocess_exec(sys.executable, str(script), str(soft), str(hard),
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = (await asyncio.wait_for(child.stdout.readline(), 60)).decode().split()
        return child, f"http://127.0.0.1:{line[1]}", int(line[3])

    child, _, nofile = await start(64, min(hard, 4096))
    child.kill()
    await child.wait()
    assert nofile == min(hard, 4096)

    child, url, nofile = await start(64, 64)
    try:
        assert nofile == 64
        held = []
        for _ in range(150):
            held.append(await _open(url))
        await asyncio.sleep(3)  # accept fails while the files last; the deadline closes what it took
        for _, writer in held:
            writer.close()
        for _ in range(100):
            try:
                status, _, _ = await _request("GET", url + "/app.js")
                if status == 200:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        assert status == 200
    finally:
        child.kill()
        await child.wait()
    log = (await child.stderr.read()).decode()
    assert log.count("cannot accept connections") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_the_ingress_cuts_off_a_body_sent_a_byte_at_a_time(monkeypatch):
    """A body that stops arriving at the ingress is a 408 after the body deadline (it was read for as
    long as the client kept the connection), and no replica is asked."""
    pytest.importorskip("starlette", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    import asyncio

    from starlette.requests import Request

    from duplex.cluster import app

    monkeypatch.setattr(app, "BODY_TIMEOUT_S", 0.5)
    ingress = _ingress(ServerOptions())
    sent = 0

    async def trickle():
        nonlocal sent
        sent += 1
        if sent > 1:
            await asyncio.sleep(3600)  # the rest never comes
        return {"type": "http.request", "body": b'{"sdp": ', "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/api/offer", "query_string": b"", "scheme": "http",
             "client": ("192.0.2.1", 5000), "server": ("127.0.0.1", 8080),
             "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json")]}
    response = asyncio.run(asyncio.wait_for(ingress(Request(scope, trickle)), 10))
    assert response.status_code == 408 and b"did not arrive within 0.5 s" in response.body


# -- 7. duplex serve --replicas stops, all of it ----------------------------------------------------------


def _processes_below(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` and its command name, from /proc."""
    import os

    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, _, rest = f.read().rpartition(")")
                fields = rest.split()
                table[int(entry)] = (int(fields[1]), fields[0], head.partition("(")[2])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, state, name) in table.items():
            if ppid == parent and state != "Z":
                found[child] = name
                todo.append(child)
    return found


@pytest.mark.slow
def test_ctrl_c_stops_serve_replicas_and_every_process_it_started():
    """`duplex serve --replicas 2` (fake profile) in a session of its own; Ctrl-C as a terminal sends it
    (SIGINT to the whole process group). It stopped after over 40 s and left Ray's dashboard and
    runtime-env agents running; now it exits within a generous 10 s (about half a second here) and no
    process it started (Ray's head, agents, the replicas) is left."""
    pytest.importorskip("ray", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    duplex = str(Path(sys.executable).with_name("duplex"))
    child = subprocess.Popen([duplex, "serve", "--replicas", "2", "--profile", "fake", "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        assert child.stdout is not None
        for line in child.stdout:
            if "open http" in line or time.monotonic() > deadline:
                break
        assert "open http" in line, "the cluster did not start"
        started = _processes_below(child.pid)
        assert any("raylet" in name for name in started.values()), started
        asked = time.monotonic()
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=10)
        took = time.monotonic() - asked
        time.sleep(0.5)  # a process SIGKILLed a moment ago may not be gone from /proc yet
        left = {pid: name for pid, name in started.items() if _processes_below(1).get(pid) == name}
        assert not left, (left, f"exited after {took:.1f} s")
        print(f"duplex serve --replicas 2 stopped {took:.2f} s after Ctrl-C; {len(started)} processes it started, "
              "none left")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
