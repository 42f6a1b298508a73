"""The fake LLM's end-of-turn estimate can be scripted from the TOML file, per text or per word
count, so a "right" estimate (low mid-sentence, confident once the sentence is complete) can be
run from the command line; before, ``[fake.llm] eot`` was one constant for every word."""

from __future__ import annotations

import asyncio

import pytest

from duplex.config import load_config
from duplex.errors import ConfigError
from duplex.fakes import build
from duplex.stages import Message


def _estimates(config_text: str, tmp_path, texts: list[str]) -> list[float | None]:
    path = tmp_path / "agent.toml"
    path.write_text(config_text)
    llm = build("llm", load_config(path))
    stream = llm.new_stream("")

    async def main() -> list[float | None]:
        return [await stream.listen([Message("user", t)]) for t in texts]

    try:
        return asyncio.run(main())
    finally:
        llm.worker.close()


def test_the_estimate_follows_the_text_then_the_word_count_then_the_constant(tmp_path):
    got = _estimates('profile = "fake"\n[fake.llm]\neot = 0.05\n'
                     'eot_by_words = { "4" = 0.97, "2" = 0.6 }\n'
                     'eot_by_text = { "what time is it" = 0.3, "thanks" = 0.99 }\n',
                     tmp_path, ["what time", "what time is", "book a table tonight", "What time is it?",
                                "Thanks.", "i would like a table"])
    assert got == [0.6, 0.05, 0.97, 0.3, 0.99, 0.05]


def test_no_table_keeps_the_constant(tmp_path):
    assert _estimates('profile = "fake"\n[fake.llm]\neot = 0.4\n', tmp_path, ["a", "a b c"]) == [0.4, 0.4]
    assert _estimates('profile = "fake"\n', tmp_path, ["a"]) == [None]


@pytest.mark.parametrize("table", ['eot_by_words = { "four" = 0.9 }', 'eot_by_words = { "4" = 1.5 }',
                                   'eot_by_text = { "hi" = "high" }'])
def test_a_bad_table_is_a_config_error(tmp_path, table):
    with pytest.raises(ConfigError, match="fake.llm"):
        _estimates(f'profile = "fake"\n[fake.llm]\n{table}\n', tmp_path, ["hi"])
