"""``duplex serve --replicas 2`` for real: a local Ray cluster, two agent replicas on the tiny
profile (every real stage) behind Serve's ingress, real aiortc clients (and, in the browser test,
headless Chromium) talking to it. Media flows between each client and the replica owning its
session; the ingress carries only signalling."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest

pytest.importorskip("ray", reason="the cluster extra is not installed: pip install -e '.[cluster]'")

from duplex.transport.client import connect, file_track  # noqa: E402
from tests.transport_fixtures import PEER_PROFILE, agent_config, jfk48  # noqa: E402

pytestmark = pytest.mark.slow
PER_REPLICA = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Two replicas of at most two sessions each, their models loaded; stopped after the module."""
    from duplex.cluster.app import ClusterOptions
    from duplex.cluster.launch import start, wait_ready
    from duplex.transport.ice import allow_loopback_candidates
    from duplex.transport.server import ServerOptions

    allow_loopback_candidates()  # the clients of this process, like the replicas, are on loopback
    options = ClusterOptions(replicas=2, server=ServerOptions(max_sessions=PER_REPLICA), loopback=True)
    running = start(agent_config(PEER_PROFILE), options, port=_free_port(), quiet=True)
    try:
        wait_ready(running)
        yield running
    finally:
        running.stop()


async def _get(url: str) -> tuple[int, dict | str, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(url) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body, dict(r.headers)


async def _send(method: str, url: str, body: dict) -> tuple[int, dict, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.request(method, url, json=body) as r:
        return r.status, await r.json(), dict(r.headers)


def _replica(client) -> str:
    return client.pc_id.split(".")[0]


async def _replicas(url: str, need: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Each replica's status row by name. A replica busy with its sessions on these two cores can miss
    the ingress's 2 s status question and show as down for one call: asked again (for up to 30 s)
    until the replicas in ``need`` (default: all) answered."""
    deadline = time.monotonic() + 30
    while True:
        status, body, _ = await _get(f"{url}/api/status")
        assert status == 200
        rows = {r["name"]: r for r in body["replicas"]}
        if all(r["up"] for name, r in rows.items() if need is None or name in need) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.5)


def _replicas_now(url: str, need: tuple[str, ...] = ()) -> dict[str, dict]:
    """:func:`_replicas`, from a test that is not a coroutine."""
    return asyncio.run(_replicas(url, need))


async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _speech() -> np.ndarray:
    from duplex.audio import SAMPLE_SPEECH

    speech = jfk48(SAMPLE_SPEECH, tail_s=8.0)
    return np.concatenate([speech[:int(2.4 * 48_000)], speech[-8 * 48_000:]])  # "And so my fellow Americans"


async def test_sessions_spread_over_replicas_and_follow_ups_reach_their_owner(cluster):
    """Four clients through the ingress get two sessions on each replica (most free capacity first),
    and each converses end to end: transcript, a reply with text, the agent's voice. A fifth offer is
    refused with 503 and Retry-After. Trickled candidates reach the owner (200, and 403 with a wrong
    secret: only the owner knows the session), a restart stays on the owner, a hang-up frees a seat on
    the owner only. The status lists both replicas with their sessions; /metrics says the same."""
    url = cluster.url
    clients = []
    try:
        for i in range(4):
            clients.append(await connect(url, file_track(_speech()), trickle=(i == 3)))
        assert sorted(_replica(c) for c in clients) == ["agent-0", "agent-0", "agent-1", "agent-1"]
        assert [_replica(c) for c in clients[:2]] == ["agent-0", "agent-1"]  # not both on the first
        for c in clients:
            await c.wait_for("conversation.item.input_audio_transcription.completed", timeout=90)
            done = (await c.wait_for("response.done", timeout=90))[0]
            assert done["transcript"]
        for c in clients:
            level = np.sqrt(np.convolve(c.audio() ** 2, np.ones(960) / 960, mode="valid"))
            assert level.max() > 0.02, "no agent voice reached this client"
        replicas = await _replicas(url)
        assert replicas["agent-0"]["sessions"] == 2 and replicas["agent-1"]["sessions"] == 2
        assert replicas["agent-0"]["pid"] != replicas["agent-1"]["pid"]

        status, body, headers = await _send("POST", f"{url}/api/offer", {
            "sdp": clients[0].pc.localDescription.sdp, "type": "offer", "pc_id": None})
        assert status == 503 and headers.get("Retry-After") and "full" in body["error"]

        owner = clients[3]
        status, body, _ = await _send("PATCH", f"{url}/api/offer", {
            "pc_id": owner.pc_id, "secret": owner.secret, "candidates": []})
        assert status == 200 and body["pc_id"] == owner.pc_id  # the public id, as the page knows it
        status, body, _ = await _send("PATCH", f"{url}/api/offer", {
            "pc_id": owner.pc_id, "secret": "not-the-secret", "candidates": []})
        assert status == 404 and "no open connection" in body["error"]  # as for an id that is not open

        restarted = await connect(url, file_track(_speech()), restart_of=clients[1])
        assert _replica(restarted) == _replica(clients[1]) and restarted.pc_id != clients[1].pc_id
        await clients[1].close()
        clients[1] = restarted
        await restarted.wait_for("session.created", timeout=30)

        status, text, _ = await _get(f"{url}/metrics")
        assert status == 200
        assert 'duplex_sessions{replica="agent-0"} 2' in text and 'duplex_sessions{replica="agent-1"} 2' in text

        leaving = next(c for c in clients if _replica(c) == "agent-0")
        await leaving.close()
        clients.remove(leaving)

        async def freed():
            r = await _replicas(url)
            return r["agent-0"]["sessions"] == 1 and r["agent-1"]["sessions"] == 2
        await _until(freed, 15, "agent-0 to release the closed session")
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    await _until(lambda: _empty(url), 20, "every session to close")


async def _empty(url: str) -> bool:
    return all(r["sessions"] == 0 for r in (await _replicas(url)).values())


async def test_a_dead_replica_ends_only_its_own_sessions(cluster):
    """Two offers at the same moment go to different replicas (the ingress counts offers in flight);
    then agent-0's process is killed. agent-1 is untouched (same
    process, its session still sending the agent's audio); a follow-up of agent-0's session is
    refused with a message to connect again; Ray restarts agent-0 and a new session is placed on it."""
    import ray

    url = cluster.url
    clients = list(await asyncio.gather(*(connect(url, file_track(_speech())) for _ in range(2))))
    try:
        by_replica = {_replica(c): c for c in clients}
        assert set(by_replica) == {"agent-0", "agent-1"}
        for c in clients:
            await c.wait_for("session.created", timeout=30)
        before = await _replicas(url)
        name = await cluster.handle("agent-0").actor_name.remote()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

        survivor = by_replica["agent-1"]
        frames = len(survivor.frames)

        async def kept_coming():  # 2 s of 20 ms frames (while Ray starts agent-0's replacement here)
            return len(survivor.frames) >= frames + 100
        await _until(kept_coming, 15, "agent-1's session to keep sending audio")
        after = await _replicas(url, need=("agent-1",))
        assert after["agent-1"]["pid"] == before["agent-1"]["pid"] and after["agent-1"]["sessions"] == 1

        dead = by_replica["agent-0"]
        status, body, _ = await _send("PATCH", f"{url}/api/offer", {
            "pc_id": dead.pc_id, "secret": dead.secret, "candidates": []})
        # agent-0 dead (503), or already back and loading (404), or loaded without the session (404)
        said = {503: "connect again" in body["error"],
                404: "has restarted" in body["error"] or "post an offer" in body["error"]}
        assert said.get(status), (status, body)

        async def restarted():
            r = (await _replicas(url, need=()))["agent-0"]
            return r.get("up") and r["pid"] != before["agent-0"]["pid"] and not r.get("loading") and r
        await _until(restarted, 180, "Ray to restart agent-0")
        fresh = await connect(url, file_track(_speech()))
        clients.append(fresh)
        assert _replica(fresh) == "agent-0"  # the most free room: the restarted replica
        await fresh.wait_for("session.created", timeout=30)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def test_the_page_talks_through_the_ingress(cluster, jfk_path, artifacts):
    """Headless Chromium opens the page from the cluster's ingress and converses with a replica:
    the user's transcript and a complete reply reach the page, and its audio element plays. Then
    that replica's process is killed: the page says its session was lost and reconnects, through
    the ingress, to a replica that is up (the other, or the killed one once Ray has restarted it)."""
    from pathlib import Path

    from tests.test_browser import CHROMEDRIVER, CHROMIUM, _driver, _wait
    from tests.transport_fixtures import speech_wav

    pytest.importorskip("selenium")
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.skip("needs Debian's chromium and chromium-driver")
    import shutil
    import tempfile

    wav = speech_wav(jfk_path, artifacts)
    profile_dir = tempfile.mkdtemp(prefix="duplex-chromium-")
    driver = _driver(wav, profile_dir)
    try:
        driver.get(cluster.url + "/")
        driver.find_element("id", "connect").click()
        _wait(driver, "window.duplex.messages.some(m => m.type === 'session.created')", 30, "the data channel")
        _wait(driver, "window.duplex.messages.some(m => "
                      "m.type === 'conversation.item.input_audio_transcription.completed')", 60, "a transcript")
        _wait(driver, "window.duplex.messages.some(m => m.type === 'response.done')", 60, "a complete reply")
        page = driver.execute_script("""return {pc: window.duplex.pcId,
            playing: !document.getElementById('agent-audio').paused,
            peak: window.duplex.stats.peakAudioLevel}""")
        assert page["pc"].split(".")[0] in ("agent-0", "agent-1")
        assert page["playing"] and page["peak"] > 0

        import ray

        owner = page["pc"].split(".")[0]
        name = cluster.handle(owner).actor_name.remote().result()
        killed = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        back = _wait(driver, """window.duplex.reconnects >= 1 && window.duplex.pcId && window.duplex.dc &&
            window.duplex.dc.readyState === 'open' && {pc: window.duplex.pcId, errors: window.duplex.errors}""",
                     60, "the page to reconnect")
        print(f"page back on {back['pc']} {time.monotonic() - killed:.1f} s after its replica was killed: "
              f"{back['errors']}")
        # A new session, on a replica that is up: the other one, or the killed one if Ray has
        # restarted it by then (both have two free seats; with the killed one gone the only choice).
        # The page asked the ingress about its quiet connection and was told (any later retry of the
        # reconnection shows its own error after that one)
        assert back["pc"] != page["pc"] and any("lost this session" in e for e in back["errors"])
        home = back["pc"].split(".")[0]
        assert _replicas_now(cluster.url, need=(home,))[home]["up"]
        (artifacts / "messages.json").write_text(json.dumps(driver.execute_script("return window.duplex.messages")))
        driver.find_element("id", "disconnect").click()
    finally:
        driver.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)
