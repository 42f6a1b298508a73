"""`duplex simulate` end to end on the fake profile (real VAD on JFK's speech)."""

from __future__ import annotations

import json
import subprocess
import sys

import soundfile as sf

from duplex.cli import main
from tests.conftest import JFK_PHRASES


def test_simulate_writes_outputs_with_phrase_boundaries(jfk_path, tmp_path, capsys):
    """The timeline has a speech start/end at each of JFK's phrase boundaries, the agent's first audio
    comes after his last phrase, and agent.wav is time-aligned with the input."""
    out = tmp_path / "sim"
    assert main(["simulate", str(jfk_path), "--profile", "fake", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "voice_to_voice" in printed and "agent:" in printed

    rows = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    starts = [r["start"] / 16000 for r in rows if r["type"] == "vad.speech_started"]
    ends = [r["end"] / 16000 for r in rows if r["type"] == "vad.speech_stopped"]
    for begin, end in JFK_PHRASES:
        assert min(abs(s - begin) for s in starts) < 0.15, (begin, starts)
        assert min(abs(e - end) for e in ends) < 0.15, (end, ends)
    last_end = JFK_PHRASES[-1][1]
    first_out = min(r["t"] for r in rows if r["type"] == "audio.out")
    assert first_out > last_end
    assert all(r["t"] >= last_end for r in rows if r["type"] == "reply.started")

    audio, rate = sf.read(out / "agent.wav")
    assert rate == 24000 and len(audio) / rate > 11.0
    loud = (abs(audio) > 0.05).nonzero()[0]
    assert loud[0] / rate >= first_out - 0.02  # the voice sits where the timeline says it starts

    record = json.loads((out / "conversation.json").read_text())
    roles = [t["role"] for t in record["turns"]]
    assert roles[:2] == ["user", "assistant"] and record["turns"][1]["heard"]


def test_cli_help_is_instant_and_errors_are_one_line(tmp_path):
    """`duplex --help` imports no model library; a missing input file is one clear line, exit 2."""
    help_out = subprocess.run([sys.executable, "-m", "duplex.cli", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "simulate" in help_out.stdout and "serve" in help_out.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, duplex.cli; "
                            "duplex.cli.build_parser(); print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"
    missing = subprocess.run([sys.executable, "-m", "duplex.cli", "simulate", str(tmp_path / "nope.wav"),
                              "--profile", "fake", "--out", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2
    assert "audio file not found" in missing.stderr and "Traceback" not in missing.stderr
    bad = subprocess.run([sys.executable, "-m", "duplex.cli", "simulate", "x.wav", "--profile", "fake",
                          "--out", str(tmp_path), "--llm-window", "8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "llm_window" in bad.stderr
