"""Agent settings from a TOML file (`--config FILE`, `Agent.load(config=path)`): every field, clear
errors naming the bad key, command-line options over the file."""

from __future__ import annotations

import pytest

from duplex.agent import Agent
from duplex.cli import build_parser, config_from_args, main
from duplex.config import load_config
from duplex.errors import ConfigError

GOOD = """
profile = "fake"
engine_slots = 6
temperature = 0
max_reply_tokens = 12
[turn]
min_silence_s = 0.25
backchannels = false
[fake.llm]
ttft_s = 0.05
"""


def _write(tmp_path, text: str, name: str = "agent.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_file_sets_fields_turn_timings_and_fake_options(tmp_path):
    """Top-level keys set AgentConfig fields (an integer where a float is expected is taken), [turn]
    the turn-taking timings and [fake] the fake stages' options."""
    config = load_config(_write(tmp_path, GOOD))
    assert (config.profile, config.engine_slots, config.temperature, config.max_reply_tokens) == ("fake", 6, 0.0, 12)
    assert isinstance(config.temperature, float)
    assert config.turn.min_silence_s == 0.25 and config.turn.backchannels is False
    assert config.fake == {"llm": {"ttft_s": 0.05}}


@pytest.mark.parametrize("text, message", [
    ("profle = 'tiny'", "unknown key 'profle'; the keys are: .*profile"),
    ("[turn]\nmax_silence = 2", r"\[turn\]: unknown key 'max_silence'"),
    ("seed = 'three'", "seed must be int, got 'three'"),
    ("graphs = 1", "graphs must be bool"),
    ("[turn]\nmin_silence_s = 3\nmax_silence_s = 1", "min_silence_s .* must not exceed"),
    ("profile = ", "not valid TOML"),
])
def test_bad_files_are_refused_naming_the_problem(tmp_path, text, message):
    """Unknown keys (with the valid ones listed), wrong types, bad values and broken TOML are each a
    ConfigError naming the file and the key."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_command_line_options_override_the_file(tmp_path, capsys):
    """`--config` fills every option not given on the command line; options given win; a bad file
    stops the command with one line naming it (exit 2)."""
    path = _write(tmp_path, GOOD)
    args = build_parser().parse_args(["serve", "--config", str(path), "--engine-slots", "3"])
    config = config_from_args(args)
    assert config.profile == "fake" and config.engine_slots == 3 and config.turn.min_silence_s == 0.25
    bad = _write(tmp_path, "[turn]\nmin_silence = 1", "bad.toml")
    assert main(["simulate", "in.wav", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "unknown key 'min_silence'" in capsys.readouterr().err


async def test_agent_load_takes_a_config_file(tmp_path):
    """`Agent.load(config=path)` loads the file's profile, and its sessions use its turn timings."""
    agent = await Agent.load(config=_write(tmp_path, GOOD))
    try:
        async with agent.session() as session:
            assert session.policy.cfg.min_silence_s == 0.25
        assert agent.config.profile == "fake"
    finally:
        await agent.aclose()
