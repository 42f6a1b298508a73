"""The listen-while-speaking dialogue LM: one loaded model shared by the sessions of an agent.

:class:`SinkLLM` implements :class:`duplex.stages.LLMModel`. It owns the model, its chat format and
one :class:`~duplex.worker.ModelWorker` thread where every session's compute runs in order; each
session's state (its own attention-sink cache) lives in a :class:`~duplex.llm.stream.SinkLLMStream`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from duplex.errors import ConfigError
from duplex.llm.chat import ChatFormat, DialogueTokens
from duplex.llm.context import SinkContext, check_window
from duplex.llm.engine import Engine
from duplex.llm.stream import SinkLLMStream
from duplex.worker import ModelWorker

USER_TURN_TOKENS = 32  # room for a few words of the user, on top of a whole reply, in "one turn"


@dataclass(frozen=True)
class LLMSettings:
    window: int = 2048  # sink-cache slots: system prompt + rolling window
    max_reply_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    backchannel_max_words: int = 4  # longer speech over the agent is always an interruption
    fixed_length: bool = False  # never stop before max_reply_tokens (benchmarks on random weights)

    @property
    def min_turn(self) -> int:
        return self.max_reply_tokens + USER_TURN_TOKENS


class SinkLLM:
    """A causal LM with RoPE behind an attention-sink cache per session."""

    def __init__(self, model: Any, tokenizer: Any, device: str, settings: LLMSettings | None = None) -> None:
        self.settings = settings or LLMSettings()
        self.engine = Engine(model, tokenizer, device)
        sliding = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
        if sliding and self.settings.window > sliding:
            raise ConfigError(f"llm_window={self.settings.window} exceeds this Mistral model's attention "
                              f"window of {sliding} tokens; use --llm-window {sliding} or less")
        self.format = ChatFormat.from_tokenizer(tokenizer, getattr(model, "generation_config", None))
        self.answer_ids = _answer_ids(self.format)
        self.worker = ModelWorker("llm", device)

    def check_system_prompt(self, system_prompt: str) -> int:
        """Raise :class:`ConfigError` if the window cannot hold this system prompt and one turn;
        returns the sink size in tokens. Blocking (tokenises)."""
        dialogue = DialogueTokens(self.format, system_prompt)
        dialogue.update([])
        sink = dialogue.system_length
        check_window(self.settings.window, sink, self.settings.min_turn)
        return sink

    def new_context(self, system_prompt: str, *, rerotate: bool = True) -> SinkContext:
        """A fresh session state (blocking: allocates the cache; run it on the worker thread)."""
        return SinkContext.create(self.engine, DialogueTokens(self.format, system_prompt), self.settings.window,
                                  min_turn=self.settings.min_turn, rerotate=rerotate)

    def new_stream(self, system_prompt: str) -> SinkLLMStream:
        return SinkLLMStream(self, system_prompt)

    def close(self) -> None:
        self.worker.close()

    async def aclose(self) -> None:
        """Stop the worker thread (the agent calls this after closing its sessions)."""
        self.close()


def _answer_ids(fmt: ChatFormat) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """First tokens of "yes" and of "no" answers, for the backchannel scoring pass."""
    def first(words: tuple[str, ...]) -> set[int]:
        return {int(fmt.encode(w)[0]) for w in words}

    yes = first(("Yes", "yes", " Yes", " yes"))
    no = first(("No", "no", " No", " no"))
    return tuple(sorted(yes - no)), tuple(sorted(no - yes))
