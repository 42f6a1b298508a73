"""``duplex say`` and ``duplex bench tts`` on the tiny profile: they run end to end through the
streaming path, and user mistakes get one clear line and exit code 2."""

from __future__ import annotations

import json

import soundfile as sf

from duplex.cli import main
from tts_fixtures import one_torch_thread, jfk24, voice_a  # noqa: F401


def test_say_writes_the_reply(tmp_path, capsys):
    """`duplex say` writes 24 kHz mono 16-bit audio, whole frames, and reports the words it spoke."""
    out = tmp_path / "say.wav"
    assert main(["say", "Hi there. Bye now.", "--out", str(out), "--profile", "tiny", "--device", "cpu"]) == 0
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    assert info.frames > 0 and info.frames % 1920 == 0
    assert "4 words" in capsys.readouterr().out


def test_say_with_a_voice(tmp_path, voice_a):
    """--voice/--voice-text run through the same path and change what is said."""
    clip = tmp_path / "voice.wav"
    sf.write(clip, voice_a.pcm, voice_a.sample_rate)
    plain, voiced = tmp_path / "plain.wav", tmp_path / "voiced.wav"
    base = ["--profile", "tiny", "--device", "cpu"]
    assert main(["say", "Hi.", "--out", str(plain), *base]) == 0
    assert main(["say", "Hi.", "--out", str(voiced), "--voice", str(clip), "--voice-text", voice_a.text,
                 *base]) == 0
    a, b = sf.read(str(plain))[0], sf.read(str(voiced))[0]
    assert len(a) != len(b) or (a != b).any()


def test_say_refuses_bad_input(tmp_path, capsys):
    """A silent voice clip, a missing transcript or empty text: exit 2 with a one-line reason."""
    silent = tmp_path / "silent.wav"
    sf.write(silent, [0.0] * 24_000 * 3, 24_000)
    out = str(tmp_path / "x.wav")
    base = ["--out", out, "--profile", "tiny", "--device", "cpu"]
    assert main(["say", "Hi.", *base, "--voice", str(silent), "--voice-text", "hello"]) == 2
    assert "silent" in capsys.readouterr().err
    assert main(["say", "Hi.", *base, "--voice", str(silent)]) == 2
    assert "transcript" in capsys.readouterr().err
    assert main(["say", "   ", *base]) == 2
    assert "empty" in capsys.readouterr().err


def test_bench_tts_runs_quick_on_tiny(tmp_path, capsys, monkeypatch):
    """`duplex bench tts --quick --batch 1 2` runs every chunk size and batch size and writes its figures
    (values not asserted). With graphs captured, it measures every batch size again eagerly and
    compares the audio. The CPU captures nothing, so here the step claims to be captured and both
    runs are eager: the comparison runs and finds the seeded audio the same from one run to the next."""
    from duplex.engine.graphs import BucketedStep

    monkeypatch.setattr(BucketedStep, "captured", property(lambda self: True))
    assert main(["bench", "tts", "--profile", "tiny", "--device", "cpu", "--quick", "--batch", "1", "2",
                 "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "tts.json").read_text())["figures"]
    rows = figures["chunk_frames"]
    assert set(rows) == {"1", "2", "4"}
    assert all({"first_audio_ms", "rtf", "ms_per_frame"} <= set(row) for row in rows.values())
    assert [r["batch"] for r in figures["batches"]] == [1, 2]
    assert all({"step_ms", "per_session_per_s", "aggregate_per_s", "rtf", "first_audio_ms"} <= set(r)
               for r in figures["batches"])
    assert set(figures["breakdown_eager_chunk_2"]) == {"backbone_ms_per_frame", "depth_ms_per_frame",
                                                       "decode_ms_per_frame"}
    assert all(r["captured_equals_eager"] and "step_ms_eager" in r for r in figures["batches"])
    out = capsys.readouterr().out
    assert "first audio" in out and "audio equal" in out
