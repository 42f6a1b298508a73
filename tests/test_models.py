"""`duplex models`: pretrained checkpoints are fetched only by `pull`; without them every command says
which model is missing and how to get it, in one line."""

from __future__ import annotations

import os
import subprocess
import sys


def _duplex(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "duplex.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_list_pull_and_missing_models_offline(tmp_path, jfk_path):
    """With an empty cache and no network: `list` marks all three missing; `pull` fails with one line
    naming the model and the fix; `simulate` on the pretrained profile names the missing model and
    `duplex models pull` instead of a stack trace."""
    listed = _duplex("models", "list", home=tmp_path)
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert len(lines) == 3 and all("missing: run `duplex models pull`" in line for line in lines)
    assert "sesame/csm-1b" in listed.stdout and "Qwen/Qwen2.5-1.5B-Instruct" in listed.stdout

    pulled = _duplex("models", "pull", home=tmp_path)
    assert pulled.returncode == 2 and "Traceback" not in pulled.stderr
    assert "cannot fetch nvidia/stt_en_fastconformer_hybrid_large_streaming_multi" in pulled.stderr

    sim = _duplex("simulate", str(jfk_path), "--out", str(tmp_path / "sim"), home=tmp_path)
    assert sim.returncode == 2 and "Traceback" not in sim.stderr
    assert "not in the local Hugging Face cache" in sim.stderr and "duplex models pull" in sim.stderr
    assert all(name in sim.stderr for name in ("stt_en_fastconformer", "Qwen2.5-1.5B", "csm-1b"))
