"""`duplex serve` as a user runs it: a separate process, a real peer, and Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys

import aiohttp
import pytest

from duplex.transport.ice import allow_loopback_candidates
from tests.transport_fixtures import connect, file_track, jfk48

pytestmark = pytest.mark.slow


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "duplex.cli", "serve", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env)
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    match = re.search(r"open (https?://127\.0\.0\.1:\d+/\S*) in a browser", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"no URL line: {line!r} {(await proc.stderr.read()).decode()[-2000:]}")
    return proc, match.group(1)


async def test_serve_runs_and_stops_cleanly_on_ctrl_c(jfk_path):
    """`duplex serve --profile fake --port 0` prints the URL to open, serves the page and a real
    peer; Ctrl-C (SIGINT) with that peer mid-conversation closes its session, hangs up on it and
    exits 0 without a traceback."""
    allow_loopback_candidates()
    proc, url = await _start("--profile", "fake", "--port", "0", "--max-sessions", "2")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 200 and "duplex" in await r.text()
        client = await connect(url.rstrip("/"), file_track(jfk48(jfk_path)))
        await client.wait_for("input_audio_buffer.speech_started", timeout=20)
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 20)
        await client.wait_for_close(timeout=10)  # the server hung up on its way out
        await client.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = (await proc.stderr.read()).decode()
    assert code == 0, err
    assert "Traceback" not in err and "Task was destroyed" not in err and "duplex serve: stopped" in err


async def test_serve_refuses_bad_ports_with_a_message():
    """A port out of range, or one already taken, ends `duplex serve` with exit 2 and one clear line."""
    bad = await asyncio.create_subprocess_exec(sys.executable, "-m", "duplex.cli", "serve", "--profile", "fake",
                                               "--port", "70000", stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode == 2 and "--port must be 0-65535" in err.decode()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = await asyncio.create_subprocess_exec(sys.executable, "-m", "duplex.cli", "serve", "--profile",
                                                    "fake", "--port", str(port), stderr=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(busy.communicate(), 60)
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in err.decode()
    assert "Traceback" not in err.decode()


async def test_serve_over_https_with_a_token(tmp_path):
    """`--cert/--key` serve the page over https:// (browsers give the microphone to secure pages
    only), `--token` puts itself in the printed link and makes offers without it a 401; a broken
    certificate pair is one clear line, exit 2."""
    import shutil
    import subprocess
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(subprocess.run, [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    proc, url = await _start("--profile", "fake", "--port", "0", "--cert", str(cert), "--key", str(key),
                             "--token", "s3cret")
    try:
        assert url.startswith("https://") and url.endswith("?token=s3cret")
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        base = url.split("?")[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(base, ssl=insecure) as r:
                assert r.status == 200 and "duplex" in await r.text()
            async with http.post(base + "api/offer", json={"sdp": "v=0", "type": "offer"}, ssl=insecure) as r:
                assert r.status == 401 and "token" in (await r.json())["error"]
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)
    bad = await asyncio.create_subprocess_exec(sys.executable, "-m", "duplex.cli", "serve", "--profile", "fake",
                                               "--port", "0", "--cert", str(key), "--key", str(cert),
                                               stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode == 2 and "cannot use --cert" in err.decode()
