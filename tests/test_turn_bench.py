"""`duplex bench turns` on the fake stages (virtual clock): the scenarios run, the JSON has its
figures, and the turn-taking properties hold: no cut-ins into pauses without a confident estimate,
fast commits with a confident right one, no missed interruptions, backchannels and noise talked over."""

from __future__ import annotations

import json
import shutil

import pytest

from duplex.cli import main


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (speech with known text)")
def test_turn_bench_on_the_fake_stages(tmp_path, capsys):
    assert main(["bench", "turns", "--profile", "fake", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "turns.json").read_text())["figures"]
    total, rows = data["total"], data["scenarios"]
    assert {"false_cut_ins", "missed_interruptions", "backchannels_interrupted", "wasted_fraction",
            "barge_in_p50_s", "confident_v2v_p50_s"} <= set(total)
    assert {(r["scenario"], r["estimate"]) for r in rows} == {
        (s, e) for s in ("jfk", "question", "pause", "um", "backchannel", "interrupt", "noise")
        for e in ("right", "wrong", "low", "absent")}
    # never talking into a pause unless an estimate was confident (and wrong)
    assert total["false_cut_ins_without_a_confident_estimate"] == 0
    assert all(r["false_cut_ins"] == 0 for r in rows if r["estimate"] != "wrong")
    assert 0 < total["confident_v2v_p50_s"] <= 0.25
    assert total["missed_interruptions"] == 0 and total["backchannels_interrupted"] == 0
    assert total["noise_interrupted"] == 0
    assert 0 < total["wasted_fraction"] < 1  # pauses cost withdrawn speculations
    assert all(not r["timeouts"] for r in rows)
    assert len(list(tmp_path.glob("turns-*.png"))) == len(rows)
    assert "total:" in capsys.readouterr().out
