"""`duplex transcribe` and `duplex bench asr` on the tiny model."""

from __future__ import annotations

import argparse

import numpy as np
import soundfile as sf

from asr_fixtures import tiny_nemo  # noqa: F401 (fixture)
from duplex.cli import build_parser


def test_transcribe_prints_partials_and_final(jfk_path, tmp_path, capsys, tiny_nemo):
    """`duplex transcribe` streams a 44.1 kHz stereo file (resampled to 16 kHz mono) in 10 ms packets:
    partial lines come with increasing stream times, then one final at the end of the file, whose text
    is what the offline path gives for the same audio at the same latency."""
    from duplex.asr.cli import transcribe_main

    args = build_parser().parse_args(["transcribe", str(jfk_path), "--profile", "tiny", "--latency", "[70,1]",
                                      "--packet-ms", "10", "--device", "cpu"])
    assert transcribe_main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    partials = [line for line in out if "partial:" in line]
    finals = [line for line in out if "final:" in line]
    assert len(partials) > 3 and len(finals) == 1 and out[-1] == finals[0]
    times = [float(line.split("s]")[0].strip("[ ")) for line in out]
    assert times == sorted(times) and abs(times[-1] - 11.0) < 0.01
    assert finals[0].split("final:")[1].split()[:3] == partials[-1].split("partial:")[1].replace("~", "").split()[:3]


def test_transcribe_other_rates_and_bad_options(tmp_path, jfk16, capsys):
    """An 8 kHz file transcribes (resampled to 16 kHz, same duration); a bad --packet-ms or --latency is
    a clear error."""
    import pytest

    from duplex.asr.cli import transcribe_main
    from duplex.audio import resample
    from duplex.errors import ConfigError

    path = tmp_path / "eight.wav"
    sf.write(path, resample(jfk16[: 3 * 16000], 16000, 8000), 8000)
    args = build_parser().parse_args(["transcribe", str(path), "--profile", "tiny", "--device", "cpu"])
    assert transcribe_main(args) == 0
    assert ": 3.00 s; ASR tiny" in capsys.readouterr().err  # 3 s at 8 kHz became 3 s at 16 kHz
    bad = build_parser().parse_args(["transcribe", str(path), "--profile", "tiny", "--packet-ms", "0"])
    with pytest.raises(ConfigError, match="packet-ms"):
        transcribe_main(bad)
    bad = build_parser().parse_args(["transcribe", str(path), "--profile", "tiny", "--latency", "[70,4]"])
    with pytest.raises(ConfigError, match="attention contexts"):
        transcribe_main(bad)


def test_bench_smoke(tmp_path, capsys, tiny_nemo):
    """`duplex bench asr --quick` runs end to end (on the tiny model here) and returns, per latency,
    step times at batch 1 and 8, RTF, real-time stream counts, the live path's RTF and NeMo's step,
    and an endpoint's flush: its frames, its eager time and the captured one's kernels (no time for
    the captured one on the CPU, where nothing is captured)."""
    from duplex.asr.bench import run

    args = build_parser().parse_args(["bench", "asr", "--profile", "tiny", "--quick", "--device", "cpu",
                                      "--out", str(tmp_path)])
    assert isinstance(args, argparse.Namespace)
    figures = run(args)
    rows = figures["contexts"]
    assert set(rows) == {"[70,1]", "[70,6]"}
    for row in rows.values():
        assert set(row["step_ms"]) == {1, 8} and all(v > 0 for v in row["step_ms"].values())
        assert np.isclose(row["rtf"], row["step_ms"][1] / row["chunk_ms"])
        assert row["live_rtf"] > 0 and row["nemo_step_ms"] > 0
        assert row["flush_frames"] >= 1 and row["flush_eager_ms"] > 0 and row["flush_ms"] is None
        assert row["flush_ops"] > row["layers"] * 20
    assert "[70,6]" in capsys.readouterr().out
