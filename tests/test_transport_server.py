"""Server hygiene: malformed and hostile requests, size limits, the session limit, vanished peers.

Every refusal must be a 4xx with a JSON message saying what was wrong, and the server must go on
serving real peers afterwards; peers that hang up or vanish mid-reply must leave no session, task
or thread behind.
"""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import numpy as np

from tests.transport_fixtures import connect, file_track, jfk48, load_agent, running_server

GOOD_HEAD = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n")
AUDIO = ("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\n"
         "a=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 00:11\r\na=setup:actpass\r\na=mid:0\r\n"
         "a=sendrecv\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n")

BAD_OFFERS = [
    # (body, what the error message must mention)
    (b"not json at all", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", "JSON object"),
    (b"{}", "'sdp'"),
    (b'{"sdp": 42, "type": "offer"}', "'sdp'"),
    (b'{"sdp": "v=0", "type": "answer"}', "'type'"),
    (b'{"sdp": "hello", "type": "offer"}', "v=0"),
    (b'{"sdp": "v=0\\r\\nm=video 9 RTP/AVP 96\\r\\n", "type": "offer"}', "no audio section"),
    (b'{"sdp": "v=0\\r\\nthis is not sdp\\r\\nm=audio 9 x 0\\r\\n", "type": "offer"}', "malformed line"),
    (b'{"sdp": "v=0\\r\\nm=audio 9 x 0\\r\\n", "type": "offer", "pc_id": "../../etc/passwd"}', "pc_id"),
    (b'{"sdp": "v=0\\r\\nm=audio 9 x 0\\r\\n", "type": "offer", "restart_pc": "yes"}', "restart_pc"),
    (b"[" * 100_00 + b"]" * 100_00, "JSON"),
    (b'{"pc_id": ' + b"1" * 5000 + b"}", "JSON"),  # past Python's limit on the digits of an integer
]
BAD_OFFERS += [(json.dumps({"sdp": GOOD_HEAD + "a=group:BUNDLE 0 0\r\n" + AUDIO + AUDIO, "type": "offer"}).encode(),
                "same a=mid")]

# Offers that pass the first look but that aiortc's parser cannot use.
HOSTILE_SDP = [
    GOOD_HEAD + "m=audio abc UDP/TLS/RTP/SAVPF 111\r\n",  # port not a number
    GOOD_HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 99999999999999999999\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n",
    GOOD_HEAD + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\na=mid:0\r\n",
    GOOD_HEAD + AUDIO + "a=fmtp:111 ;;;=;=\r\na=ssrc:abc cname:x\r\n",
    GOOD_HEAD + AUDIO.replace("a=sendrecv", "a=recvonly"),  # no microphone to receive
]


async def _request(method: str, url: str, data: bytes | None = None, **kw) -> tuple[int, dict]:
    if data is not None:  # raw bodies are sent as JSON, as the page sends them (the server refuses other types)
        kw["headers"] = {"Content-Type": "application/json", **kw.get("headers", {})}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, data=data, **kw) as r:
            body = await r.json(content_type=None) if r.content_type == "application/json" else {}
            return r.status, {**body, "_headers": dict(r.headers)}


async def test_malformed_and_hostile_offers_get_clear_4xx(jfk_path):
    """Broken JSON, wrong shapes and types, bad SDP, hostile SDP that reaches aiortc's parser, bad
    trickle candidates and unknown connections all get a 4xx JSON message naming the problem; no
    session is left open, and a real peer connects afterwards."""
    agent = await load_agent()
    try:
        async with running_server(agent, admin_token="op") as (server, url):
            for body, needle in BAD_OFFERS:
                status, reply = await _request("POST", f"{url}/api/offer", body)
                assert status == 400, (body[:40], status, reply)
                assert needle in reply["error"], (needle, reply["error"])
            for sdp in HOSTILE_SDP:
                status, reply = await _request("POST", f"{url}/api/offer", json={"sdp": sdp, "type": "offer"})
                assert status == 400 and reply["error"].startswith("cannot use this offer"), (sdp, status, reply)
            assert not server.peers and not agent.sessions

            status, reply = await _request("PATCH", f"{url}/api/offer", json={"pc_id": "pc_nothere", "candidates": []})
            assert status == 404 and "post an offer first" in reply["error"]
            client = await connect(url, file_track(jfk48(jfk_path)))
            try:
                for candidates, needle in [
                    ("nope", "list"),
                    ([{"candidate": "candidate:1 1 udp 1 1.2.3.4 99999 typ host", "sdp_mid": "0"}], "out of range"),
                    ([{"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host"}], "sdp_mid"),
                    ([{"candidate": "candidate:1 1 sctp 1 1.2.3.4 5 typ host", "sdp_mid": "0"}], "protocol"),
                    ([{"candidate": "garbage", "sdp_mid": "0"}], "malformed ICE candidate"),
                    ([{"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host", "sdp_mid": "0"}] * 65, "too many"),
                ]:
                    status, reply = await _request("PATCH", f"{url}/api/offer",
                                                   json={"pc_id": client.pc_id, "candidates": candidates})
                    assert status == 400 and needle in reply["error"], (candidates, reply)
                await client.wait_for("input_audio_buffer.speech_started", timeout=15)
                status, reply = await _request("GET", f"{url}/api/status", headers={"Authorization": "Bearer op"})
                assert status == 200 and reply["sessions"] == 1
                assert reply["peers"][client.pc_id]["input_peak_rms"] > 0.05
            finally:
                await client.close()
            status, _ = await _request("GET", f"{url}/")
            assert status == 200
            status, reply = await _request("DELETE", f"{url}/api/offer")
            assert status == 405 and reply["error"]
    finally:
        await agent.aclose()


async def test_body_size_limits():
    """Bodies over the cap get 413 whether their length is declared or streamed in chunks, and
    the server keeps answering."""
    agent = await load_agent()
    try:
        async with running_server(agent, max_body=16_384) as (server, url):
            big = b'{"sdp": "' + b"a" * 20_000 + b'", "type": "offer"}'
            status, reply = await _request("POST", f"{url}/api/offer", big)
            assert status == 413 and "at most 16384 bytes" in reply["error"]

            async def chunks():
                for _ in range(40):
                    yield b"x" * 1024

            status, reply = await _request("POST", f"{url}/api/offer", chunks())
            assert status == 413 and "too large" in reply["error"]
            status, reply = await _request("PATCH", f"{url}/api/offer", b"[" + b"0," * 10_000 + b"0]")
            assert status == 413
            long_sdp = "v=0\r\n" + "a=x\r\n" * 3_000 + "m=audio 9 x 0\r\n"
            async with running_server(agent, max_body=64_000) as (_, url2):
                status, reply = await _request("POST", f"{url2}/api/offer", json={"sdp": long_sdp, "type": "offer"})
                assert status == 400 and "too many lines" in reply["error"]
            status, _ = await _request("GET", f"{url}/api/status")
            assert status == 200
    finally:
        await agent.aclose()


async def test_session_limit_answers_503(jfk_path):
    """With max_sessions=2, a third offer gets 503 with Retry-After while two peers are connected;
    once one hangs up, a new peer gets in."""
    agent = await load_agent()
    pcm = jfk48(jfk_path)
    try:
        async with running_server(agent, max_sessions=2) as (server, url):
            a = await connect(url, file_track(pcm))
            b = await connect(url, file_track(pcm))
            await asyncio.gather(a.wait_for("session.created"), b.wait_for("session.created"))
            offer = {"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer"}
            status, reply = await _request("POST", f"{url}/api/offer", json=offer)
            assert status == 503 and "limit of 2" in reply["error"]
            assert reply["_headers"].get("Retry-After") == "10"
            await a.close()
            for _ in range(50):
                if len(server.peers) < 2:
                    break
                await asyncio.sleep(0.1)
            c = await connect(url, file_track(pcm))
            await c.wait_for("session.created", timeout=10)
            assert len(server.peers) == 2
            await asyncio.gather(b.close(), c.close())
    finally:
        await agent.aclose()


async def test_peers_leaving_mid_reply_leave_nothing_behind(jfk_path):
    """20 peers, 5 at a time, leave while the agent is answering them: half hang up, half just go
    silent (a frozen tab, a dropped network) and are closed by the server's idle timeout. Afterwards
    no peer, session, asyncio task or thread is left beyond what was there before."""
    agent = await load_agent()
    pcm = jfk48(jfk_path)
    try:
        # 2.5 s: short for the test, long enough that a loaded loop (ten peers' codecs and VADs share it
        # with the clients) never closes a peer that is still sending
        async with running_server(agent, max_sessions=5, idle_timeout_s=2.5) as (server, url):
            await _one_round(url, pcm, 1, vanish=False)  # warm up: codecs, executor threads
            await _settle(server)
            tasks_before = {t.get_name() for t in asyncio.all_tasks()}
            threads_before = {t.ident for t in threading.enumerate()}
            for round_ in range(4):
                await _one_round(url, pcm, 5, vanish=bool(round_ % 2))
                await _settle(server)
            assert not server.peers and not agent.sessions
            assert server.closed_peers == 21
            assert server.close_reasons["no audio for 2.5 s"] == 10  # the silent ones: the idle timeout
            await asyncio.sleep(0.2)
            left_tasks = [t for t in asyncio.all_tasks() if t.get_name() not in tasks_before]
            assert not left_tasks, left_tasks
            new_threads = [t for t in threading.enumerate()
                           if t.ident not in threads_before and not t.name.startswith("asyncio_")]
            assert not new_threads, new_threads
    finally:
        await agent.aclose()


async def _one_round(url: str, pcm: np.ndarray, n: int, vanish: bool) -> None:
    mics = [file_track(pcm) for _ in range(n)]
    clients = await asyncio.gather(*(connect(url, m) for m in mics))
    await asyncio.gather(*(c.wait_for("output_audio_buffer.started", timeout=30) for c in clients))
    if vanish:
        for mic in mics:
            mic.freeze()  # no more packets: the server must notice on its own
        await asyncio.gather(*(c.wait_for_close(timeout=10) for c in clients))
    await asyncio.gather(*(c.close() for c in clients))


async def _settle(server, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if not server.peers:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"peers still open: {list(server.peers)}")


async def test_a_session_cannot_be_taken_over(jfk_path):
    """Only the page that opened a connection (holding the secret from its answer) can renegotiate,
    restart it or add candidates: another client that knows the pc_id, with no secret or a wrong one,
    is answered as if it were not open (an offer gets a new session of its own, candidates a 404), and
    the owner's session goes on; the status shows counts and states, and the ids only to the operator."""
    agent = await load_agent()
    try:
        async with running_server(agent, admin_token="op-secret", max_sessions=10) as (server, url):
            owner = await connect(url, file_track(jfk48(jfk_path)))
            try:
                await owner.wait_for("session.created", timeout=10)
                assert owner.secret and len(owner.secret) >= 24
                sdp = owner.pc.localDescription.sdp
                # one character off (never the secret itself, whatever its last character is)
                near_miss = owner.secret[:-1] + ("y" if owner.secret.endswith("x") else "x")
                for secret in (None, "guess", near_miss, "\u00e9" * 24):  # non-ASCII text: a 403 too, never a 500
                    for extra in ({}, {"restart_pc": True}):
                        status, reply = await _request("POST", f"{url}/api/offer", json={
                            "sdp": sdp, "type": "offer", "pc_id": owner.pc_id, "secret": secret, **extra})
                        assert status == 200 and reply["pc_id"] != owner.pc_id and reply["secret"] != owner.secret
                        await server.peers[reply["pc_id"]].close("test")
                    status, reply = await _request("PATCH", f"{url}/api/offer", json={
                        "pc_id": owner.pc_id, "secret": secret, "candidates": []})
                    assert status == 404 and "no open connection" in reply["error"]
                assert list(server.peers) == [owner.pc_id] and not server.peers[owner.pc_id].closed
                status, reply = await _request("PATCH", f"{url}/api/offer", json={
                    "pc_id": owner.pc_id, "secret": owner.secret, "candidates": []})
                assert status == 200
                status, reply = await _request("GET", f"{url}/api/status")
                assert reply["sessions"] == 1 and "peers" not in reply and owner.pc_id not in json.dumps(reply)
                assert sum(reply["states"].values()) == 1
                status, reply = await _request("GET", f"{url}/api/status",
                                               headers={"Authorization": "Bearer op-secret"})
                assert list(reply["peers"]) == [owner.pc_id]
            finally:
                await owner.close()
    finally:
        await agent.aclose()


async def test_offers_need_the_token_when_the_server_has_one(jfk_path):
    """With --token, an offer or a candidate request without it (or with another) is a 401 naming
    the fix; the right one connects."""
    agent = await load_agent()
    try:
        async with running_server(agent, token="t0ken") as (server, url):
            offer = {"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer"}
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "t0ken"}):
                status, reply = await _request("POST", f"{url}/api/offer", json=offer, headers=headers)
                assert status == 401 and "?token=" in reply["error"], headers
                status, reply = await _request("PATCH", f"{url}/api/offer", headers=headers,
                                               json={"pc_id": "pc_x", "candidates": []})
                assert status == 401
            client = await connect(url, file_track(jfk48(jfk_path)), token="t0ken")
            try:
                await client.wait_for("session.created", timeout=10)
            finally:
                await client.close()
    finally:
        await agent.aclose()


async def test_every_refusal_has_a_json_body():
    """A missing page or file, an unknown API path and a wrong method all answer JSON {error}."""
    agent = await load_agent()
    try:
        async with running_server(agent) as (_, url):
            for method, path, code in (("GET", "/nothing.js", 404), ("GET", "/api/nope", 404),
                                       ("DELETE", "/api/offer", 405)):
                status, reply = await _request(method, f"{url}{path}")
                assert status == code and reply.get("error"), (path, status, reply)
    finally:
        await agent.aclose()


async def test_a_vanished_peer_is_released_by_the_default_timeout(jfk_path):
    """With the default options a peer that stops sending (a closed laptop lid) is released after
    4 s without audio, so within 5 s, with its reason."""
    agent = await load_agent()
    try:
        async with running_server(agent) as (server, url):
            mic = file_track(jfk48(jfk_path))
            client = await connect(url, mic)
            await client.wait_for("input_audio_buffer.speech_started", timeout=20)
            mic.freeze()
            loop = asyncio.get_running_loop()
            start = loop.time()
            await _settle(server, timeout=10)
            released = loop.time() - start
            assert not server.peers and server.close_reasons["no audio for 4 s"] == 1
            assert released <= 5.0, released
            await client.close()
    finally:
        await agent.aclose()


async def test_slow_candidates_are_a_504_not_a_500(jfk_path, monkeypatch):
    """Candidates the server cannot add in time (here an mDNS '.local' name nobody answers for, with
    the limit cut to 0.3 s) get a 504 naming the likely cause; the connection stays open."""
    from duplex.transport import server as server_module

    monkeypatch.setattr(server_module, "CANDIDATES_TIMEOUT_S", 0.3)
    agent = await load_agent()
    try:
        async with running_server(agent) as (server, url):
            owner = await connect(url, file_track(jfk48(jfk_path)), trickle=True)  # no end-of-candidates yet
            try:
                await owner.wait_for("session.created", timeout=10)
                # an mDNS name as browsers make them (a UUID): aioice asks the network and waits for an answer
                candidate = "candidate:1 1 udp 2122260223 3f2c5e0a-8b1d-4c6e-9f7a-2d4b6c8e0a1f.local 54321 typ host"
                status, reply = await _request("PATCH", f"{url}/api/offer", json={
                    "pc_id": owner.pc_id, "secret": owner.secret,
                    "candidates": [{"candidate": candidate, "sdp_mid": "0"}] * 3})
                assert status == 504 and ".local" in reply["error"], (status, reply)
                assert not server.peers[owner.pc_id].closed
            finally:
                await owner.close()
    finally:
        await agent.aclose()


async def test_an_offer_answered_during_shutdown_leaves_no_peer(monkeypatch):
    """An offer still being answered when the server starts closing is refused (503) and its peer
    closed: nothing is left running against a closed agent. (The real answer is held back until the
    server has closed, so the race happens every time.)"""
    from aiortc import RTCPeerConnection

    from duplex.transport import server as server_module
    from duplex.transport.server import Server, ServerOptions

    answered, release = asyncio.Event(), asyncio.Event()
    made = []
    real_open_peer = server_module.open_peer

    async def held_back(*args, **kwargs):
        peer, answer = await real_open_peer(*args, **kwargs)
        made.append(peer)
        answered.set()
        await release.wait()
        return peer, answer

    monkeypatch.setattr(server_module, "open_peer", held_back)
    agent = await load_agent()
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        body = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode()
        server = Server(agent, ServerOptions())
        offer = asyncio.create_task(server.offer(body))
        await answered.wait()  # the offer is being answered
        await server.close()
        release.set()
        answer = await offer
        assert made and made[0].closed
        assert answer.status == 503 and "shutting down" in answer.body["error"]
        assert not server.peers
    finally:
        await pc.close()
        await agent.aclose()


async def test_a_restart_keeps_its_seat_and_runs_once(jfk_path, monkeypatch):
    """On a full server (one seat), a page restarting its connection keeps the seat: an offer from
    someone else while the restart is answered gets 503, not the seat the old connection freed. A
    second restart of the same connection meanwhile gets 409, so no orphan peer is opened. The
    restart then answers, and exactly one peer is open, continuing the old connection's conversation
    record (a restart is the same conversation on a new connection)."""
    from duplex.transport import server as server_module
    from duplex.transport.client import connect as client_connect

    answered, release = asyncio.Event(), asyncio.Event()
    real_open_peer = server_module.open_peer
    calls = []

    async def held_back(*args, **kwargs):
        calls.append(1)
        result = await real_open_peer(*args, **kwargs)
        if len(calls) == 2:  # the restart's
            answered.set()
            await release.wait()
        return result

    monkeypatch.setattr(server_module, "open_peer", held_back)
    agent = await load_agent()
    try:
        async with running_server(agent, max_sessions=1) as (server, url):
            owner = await client_connect(url, file_track(jfk48(jfk_path)))
            await owner.wait_for("session.created", timeout=10)
            record = server.peers[owner.pc_id].session.conversation
            restart = asyncio.create_task(client_connect(url, file_track(jfk48(jfk_path)), restart_of=owner))
            await answered.wait()
            sdp = owner.pc.localDescription.sdp
            status, reply = await _request("POST", f"{url}/api/offer", json={"sdp": sdp, "type": "offer"})
            assert status == 503 and "limit of 1" in reply["error"]
            status, reply = await _request("POST", f"{url}/api/offer", json={
                "sdp": sdp, "type": "offer", "pc_id": owner.pc_id, "secret": owner.secret, "restart_pc": True})
            assert status == 409 and "already under way" in reply["error"]
            release.set()
            new = await restart
            try:
                await new.wait_for("session.created", timeout=10)
                assert list(server.peers) == [new.pc_id] and len(calls) == 2
                assert server.peers[new.pc_id].session.conversation is record and new.answer["resumed"]
            finally:
                await new.close()
                await owner.close()
    finally:
        await agent.aclose()
