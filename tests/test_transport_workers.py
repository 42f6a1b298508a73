"""`duplex serve --workers 2` as a user runs it: a front process, two worker processes and one engine
core; real aiortc peers placed on the workers, a worker killed and started again, and Ctrl-C stopping
them all."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal

import aiohttp
import pytest

from duplex.audio import read_audio, resample
from duplex.transport.ice import allow_loopback_candidates
from tests.test_transport_cli import _start
from tests.transport_fixtures import connect, file_track, jfk48

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not running
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _command(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


async def _status_when(http, base: str, done, tries: int = 50) -> dict:
    """The front's /api/status once ``done(status)`` holds (asked every 0.2 s), else the last one."""
    for _ in range(tries):
        async with http.get(f"{base}/api/status") as r:
            status = await r.json()
        if done(status):
            break
        await asyncio.sleep(0.2)
    return status


async def test_sessions_spread_over_workers_that_share_one_core(jfk_path):
    """Two peers land on two different workers (the one with most room first) and both converse
    (speech heard, a reply's audio received) through the one engine core; the status sums the workers;
    a client reconnecting with its resume token continues on the worker that keeps its conversation;
    a Realtime WebSocket client converses through the front's relay to a worker;
    a worker killed is shown down, its seats gone, and the next offer goes to the survivor; the front
    starts it again, and a new session lands on it and is heard; Ctrl-C stops the front, the workers
    and the core (no process left, exit 0, no traceback)."""
    allow_loopback_candidates()
    proc, url = await _start("--profile", "fake", "--port", "0", "--max-sessions", "4", "--workers", "2")
    base = url.rstrip("/")
    clients = []
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                clients.append(await connect(base, file_track(jfk48(jfk_path))))
            assert {c.pc_id.split(".")[0] for c in clients} == {"worker-0", "worker-1"}
            for c in clients:
                await c.wait_for("input_audio_buffer.speech_started", timeout=30)
                await c.wait_for("response.done", timeout=60)
                assert len(c.audio()) > 0, "the agent's reply was heard"
            async with http.get(f"{base}/api/status") as r:
                status = await r.json()
            assert status["sessions"] == 2 and status["max_sessions"] == 4 and status["replicas_up"] == 2
            pids = {w["name"]: w["pid"] for w in status["replicas"]}
            assert all(w["sessions"] == 1 for w in status["replicas"])

            # a client that reconnects with its resume token is placed on the worker keeping its record
            gone = clients.pop(1)
            await gone.close()
            await _status_when(http, base, lambda s: s["sessions"] == 1)
            token = gone.answer["resume_token"]
            assert token.split(".")[0] == gone.pc_id.split(".")[0]
            back = await connect(base, file_track(jfk48(jfk_path)), resume=token)
            clients.append(back)
            assert back.answer["resumed"] is True and back.pc_id.split(".")[0] == gone.pc_id.split(".")[0]

            # /v1/realtime is relayed to a worker: a spoken turn in, the agent's voice out
            speech, rate = read_audio(jfk_path)
            said = (resample(speech, rate, 24_000)[4_800:57_600] * 32767).astype("<i2")
            async with http.ws_connect(f"{base}/v1/realtime") as ws:
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "session.created"
                for i in range(0, len(said), 480):
                    chunk = base64.b64encode(said[i:i + 480].tobytes()).decode()
                    await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                    await asyncio.sleep(0.02)
                kinds: list[str] = []
                while "response.done" not in kinds:
                    kinds.append(json.loads((await ws.receive(timeout=30)).data)["type"])
                assert "input_audio_buffer.speech_started" in kinds and "response.output_audio.delta" in kinds
                async with http.get(f"{base}/api/status") as r:
                    assert (await r.json())["sessions"] == 3  # two WebRTC peers and this socket, summed

            os.kill(pids["worker-0"], signal.SIGKILL)
            status = await _status_when(http, base, lambda s: s["replicas_up"] == 1)
            assert status["replicas_up"] == 1 and status["max_sessions"] == 2, status
            survivor = await connect(base, file_track(jfk48(jfk_path)))
            clients.append(survivor)
            assert survivor.pc_id.startswith("worker-1.")
            patch = {"pc_id": clients[0].pc_id, "secret": clients[0].secret, "candidates": []}
            async with http.patch(f"{base}/api/offer", data=json.dumps(patch),
                                  headers={"Content-Type": "application/json"}) as r:
                assert r.status == 503 and "worker-0" in (await r.json())["error"]

            # the front starts the killed worker again (after RESTART_S): its seats come back, and the
            # next session is placed on it (it has the most room) and converses
            status = await _status_when(http, base, lambda s: s["replicas_up"] == 2, tries=300)
            assert status["replicas_up"] == 2 and status["max_sessions"] == 4, status
            pids_again = {w["name"]: w["pid"] for w in status["replicas"]}
            assert pids_again["worker-0"] != pids["worker-0"] and pids_again["worker-1"] == pids["worker-1"]
            again = await connect(base, file_track(jfk48(jfk_path)))
            clients.append(again)
            assert again.pc_id.startswith("worker-0.")
            await again.wait_for("input_audio_buffer.speech_started", timeout=30)
        core = [pid for pid in _children(proc.pid) if b"duplex.core.process" in _command(pid)]
        assert len(core) == 1
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        for c in clients:
            await c.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert code == 0, err
    assert "Traceback" not in err and "duplex serve: stopped" in err
    assert "worker worker-0 has gone" in err and "starting it again in 5 s" in err and "worker worker-0 is back" in err
    for pid in [pids["worker-1"], pids_again["worker-0"], *core]:
        assert not _alive(pid), f"process {pid} outlived duplex serve"


class _Process:
    returncode = -9

    async def wait(self) -> int:
        return self.returncode


class _Launcher:
    """Starts a stand-in worker, failing the first ``failures`` times; records when each start came."""

    def __init__(self, failures: int) -> None:
        self.failures, self.starts = failures, []

    async def start(self, index):
        from duplex.transport.workers import Worker

        self.starts.append(asyncio.get_running_loop().time())
        if len(self.starts) <= self.failures:
            raise RuntimeError("the engine core is not there")
        return Worker(f"worker-{index}", _Process())

    def close(self) -> None:
        pass


@pytest.mark.parametrize("failures", [0, 2])
async def test_a_worker_that_goes_is_started_again_later_each_time_it_fails(monkeypatch, failures):
    """The front starts a worker that went again after RESTART_S, doubling the wait after each start
    that fails and for a worker that goes again soon after it started; the new worker takes the old
    one's place (and is itself started again when it goes)."""
    from duplex.transport import workers
    from duplex.transport.server import ServerOptions

    monkeypatch.setattr(workers, "RESTART_S", 0.05)
    monkeypatch.setattr(workers, "RESTART_MAX_S", 0.5)
    launcher = _Launcher(failures)
    old = workers.Worker("worker-0", _Process())
    front = workers.Front({"worker-0": old}, ServerOptions(max_sessions=2), launcher)  # type: ignore[arg-type]

    async def replaced(worker) -> float:
        """``worker`` goes; returns when, once another has taken its place."""
        went = asyncio.get_running_loop().time()
        front._gone(worker)
        for _ in range(200):
            if front.workers["worker-0"] is not worker:
                break
            await asyncio.sleep(0.01)
        assert front.workers["worker-0"] is not worker
        return went

    went = await replaced(old)
    back = front.workers["worker-0"]
    assert len(launcher.starts) == failures + 1
    waits = [b - a for a, b in zip([went, *launcher.starts], launcher.starts)]
    for wait, least in zip(waits, [0.05, 0.1, 0.2]):
        assert wait >= least * 0.9, waits
    # it goes again at once: the wait doubles from the last one
    again = await replaced(back)
    assert launcher.starts[-1] - again >= 2 * [0.05, 0.1, 0.2][failures] * 0.9
    await front.close()


async def test_closing_the_front_cancels_a_restart_in_progress(monkeypatch):
    """A front closed while a worker is being started again cancels that start (the launcher's start
    closes what it had begun), installs nothing, and leaves no restart behind."""
    from duplex.transport import workers
    from duplex.transport.server import ServerOptions

    monkeypatch.setattr(workers, "RESTART_S", 0.01)
    started, cancelled = asyncio.Event(), []

    class Hanging(_Launcher):
        async def start(self, index):
            started.set()
            try:
                await asyncio.Event().wait()  # a worker that never says hello
            except asyncio.CancelledError:
                cancelled.append(index)
                raise

    old = workers.Worker("worker-0", _Process())
    front = workers.Front({"worker-0": old}, ServerOptions(max_sessions=2), Hanging(0))  # type: ignore[arg-type]
    front._gone(old)
    await asyncio.wait_for(started.wait(), 5)
    await front.close()
    assert cancelled == [0] and front.workers["worker-0"] is old and not front._restarts
