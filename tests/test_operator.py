"""What an operator and a new user see: `duplex doctor`, clear errors for missing extras and old
versions (simulated by hiding a module or faking a version), and `duplex serve`'s session logs."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import re
import subprocess
import sys

import pytest

from duplex import requirements
from duplex.cli import JsonFormatter, main
from duplex.errors import DependencyError
from tests.transport_fixtures import connect, file_track, jfk48, load_agent, running_server


def test_doctor_reports_each_check_and_exits_zero_when_ready(capsys):
    """`duplex doctor` prints a verdict for Python, every package, extras, devices, tools, models,
    disk and the port; here (everything installed) nothing needed is missing."""
    assert main(["doctor", "--port", "0"]) == 0
    out = capsys.readouterr().out
    for needle in ("Python 3.", "transformers ", "extra [asr] installed", "CPU:", "espeak-ng", "checkpoint",
                   "GB free", "free for duplex serve", "0 failed"):
        assert needle in out, needle


def test_doctor_fails_when_a_needed_package_is_too_old(monkeypatch, capsys):
    """A core package below its floor is a FAIL line naming the version needed, and exit status 1."""
    real = requirements.installed
    monkeypatch.setattr(requirements, "installed", lambda p: "4.46.0" if p == "transformers" else real(p))
    import duplex.doctor as doctor

    monkeypatch.setattr(doctor, "installed", requirements.installed)
    assert main(["doctor", "--port", "0"]) == 1
    out = capsys.readouterr().out
    floor = requirements.FLOORS["transformers"]
    assert f"FAIL  transformers 4.46.0 is installed, but duplex needs transformers >= {floor}" in out


def test_an_old_transformers_is_refused_at_import(monkeypatch):
    """Importing the LLM or TTS package with a transformers older than the floor raises at once with
    the version needed and the pip command (not a silent misbehaviour later)."""
    import duplex.llm
    import duplex.tts

    floor = re.escape(requirements.FLOORS["transformers"])
    for old in ("4.57.1", "5.20.2"):  # 5.20.2: the release just below the floor (no Mimi decoder_seanet)
        monkeypatch.setattr(requirements, "installed", lambda p, old=old: old if p == "transformers" else "99.0")
        for module in (duplex.llm, duplex.tts):
            with pytest.raises(DependencyError, match=rf"transformers {re.escape(old)} is installed, but duplex "
                                                      rf"needs transformers >= {floor}: pip install -U"):
                importlib.reload(module)
    monkeypatch.undo()
    importlib.reload(duplex.llm)
    importlib.reload(duplex.tts)


@pytest.mark.parametrize("hidden, command", [
    ("nemo", ["simulate", "duplex/data/jfk.flac", "--out", "OUT", "--profile", "tiny"]),
    ("sentencepiece", ["transcribe", "duplex/data/jfk.flac", "--profile", "tiny"]),
])
def test_a_missing_extra_is_one_line_naming_the_extra(tmp_path, hidden, command):
    """With a package of the [asr] extra missing (hidden from imports), the command prints one line
    naming the extra and the pip command, exit status 2, no traceback."""
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    code = (f"import sys; sys.modules[{hidden!r}] = None\n"
            f"from duplex.cli import main; sys.exit(main({args!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs duplex's 'asr' extra" in proc.stderr and "pip install -e '.[asr]'" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_serve_logs_each_session_open_and_close(jfk_path, caplog):
    """At duplex serve's default level (info for duplex's loggers) each session's open and close is a
    log line; the close names the reason and the duration; --log-json turns records into JSON."""
    agent = await load_agent()
    caplog.set_level(logging.INFO, logger="duplex.transport.server")
    try:
        async with running_server(agent) as (server, url):
            client = await connect(url, file_track(jfk48(jfk_path)))
            await client.wait_for("session.created", timeout=10)
            await client.close()
            for _ in range(50):
                if not server.peers:
                    break
                await asyncio.sleep(0.1)
    finally:
        await agent.aclose()
    opened = [r for r in caplog.records if getattr(r, "event", None) == "session_opened"]
    closed = [r for r in caplog.records if getattr(r, "event", None) == "session_closed"]
    assert len(opened) == 1 and len(closed) == 1
    assert closed[0].reason and closed[0].duration_s >= 0 and "closed after" in closed[0].getMessage()
    line = json.loads(JsonFormatter().format(closed[0]))
    assert line["event"] == "session_closed" and line["level"] == "info" and "reason" in line


def test_log_levels_by_command():
    """serve logs duplex's info lines by default, other commands warnings; --log-level wins."""
    from duplex.cli import build_parser, setup_logging

    logger = logging.getLogger("duplex")
    before = logger.level, logging.getLogger().handlers[:], logging.getLogger().level
    try:
        for argv, level in ((["serve"], logging.INFO), (["doctor"], logging.WARNING),
                            (["--log-level", "error", "serve"], logging.ERROR)):
            setup_logging(build_parser().parse_args(argv))
            assert logger.level == level, argv
    finally:
        logger.setLevel(before[0])
        logging.getLogger().handlers[:] = before[1]
        logging.getLogger().setLevel(before[2])
