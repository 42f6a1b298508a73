"""The three real stages together (tiny profile): NeMo streaming ASR, sink-cache LLM, CSM/Mimi TTS."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from duplex.cli import main
from tests.conftest import JFK_PHRASES


def test_simulate_tiny_runs_all_real_stages(jfk_path, tmp_path, capsys):
    """`duplex simulate jfk.flac --profile tiny` recognises (babbled) words with the real streaming ASR,
    ends the turn after JFK stops, and the LLM's reply is spoken by the codec TTS: the three files
    hold the turn, the reply's words with their audio, and the record of what was heard."""
    out = tmp_path / "sim"
    assert main(["simulate", str(jfk_path), "--profile", "tiny", "--out", str(out)]) == 0
    assert "voice_to_voice" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    kinds = {r["type"] for r in rows}
    assert {"transcript.partial", "transcript.final", "turn.ended", "reply.text", "reply.audio", "audio.out",
            "turn.estimate"} <= kinds
    turn = next(r for r in rows if r["type"] == "turn.ended")
    assert turn["text"] and turn["t"] > JFK_PHRASES[-1][1]
    words = [w for r in rows if r["type"] == "reply.audio" for w in r["words"]]
    assert words and all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))

    audio, rate = sf.read(out / "agent.wav")
    first_out = next(r["t"] for r in rows if r["type"] == "audio.out")
    assert rate == 24000
    assert np.abs(audio[: int(first_out * rate) - 480]).max() == 0  # silent until the agent speaks
    assert np.abs(audio[int(first_out * rate):]).max() > 0.001  # then the codec's voice

    record = json.loads((out / "conversation.json").read_text())
    user, agent = record["turns"][:2]
    assert user["role"] == "user" and user["text"] == turn["text"]
    assert agent["role"] == "assistant" and agent["heard"]
    assert agent["heard"] == " ".join(w["text"] for w in agent["words"][: len(agent["heard"].split())])


def test_a_sweep_row_gives_the_share_of_asr_steps_decoded_again():
    """A concurrency row says which share of the ASR's captured steady steps decoded their chunk again
    (more labels than the step's label steps make room for), and None where no step was captured."""
    from duplex.e2e import concurrency_row

    common = dict(lags=[0.01], underruns=0, v2v=[], ticks={}, rows={}, gpu=[], cpu_s_per_s={}, listens=None, wall=2.0)
    assert concurrency_row(2, asr_steps=(40, 3), **common)["asr_decoded_again"] == 0.075
    assert concurrency_row(2, asr_steps=(0, 0), **common)["asr_decoded_again"] is None
    assert concurrency_row(2, **common)["asr_decoded_again"] is None
