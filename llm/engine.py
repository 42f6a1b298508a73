"""Model compute for the dialogue LM: a forward pass over new tokens into a sink cache, sampling, and
incremental detokenisation. Everything here is blocking and runs on the LLM's worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from duplex.llm.sink_cache import SinkCache, rope_inv_freq


class Engine:
    """A causal LM with RoPE, ready to run into attention-sink caches."""

    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.inv_freq = rope_inv_freq(model)  # raises ConfigError for models without usable RoPE
        self.num_layers = model.config.num_hidden_layers
        self.dtype = next(model.parameters()).dtype
        # Checkpoints pad their embedding matrix (Qwen2.5: 151936 rows for 151665 tokens): never sample
        # an id the tokenizer cannot turn back into text.
        self.vocab = min(len(tokenizer), model.config.vocab_size)

    def new_cache(self, capacity: int, *, rerotate: bool = True) -> SinkCache:
        cfg = self.model.config
        cache = SinkCache(self.num_layers, capacity, self.inv_freq, rerotate=rerotate)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cache.early_initialization(1, cfg.num_key_value_heads, head_dim, self.dtype, self.device)
        return cache

    @torch.inference_mode()
    def forward(self, cache: Any, ids: Sequence[int]) -> torch.Tensor:
        """Run ``ids`` after what ``cache`` holds; returns the next-token logits ``[V]`` (fp32)."""
        n = len(ids)
        start = cache.get_seq_length()
        input_ids = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]  # [1, T]
        positions = torch.arange(start, start + n, device=self.device)[None]  # [1, T]: slot = position
        out = self.model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        logits = out.logits[0, -1].float()  # [V]
        if self.vocab < logits.shape[0]:
            logits[self.vocab:] = float("-inf")
        return logits


@torch.inference_mode()
def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from ``logits`` ``[V]``: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_probability(logits: torch.Tensor, token_ids: Sequence[int]) -> float:
    """Total probability of ``token_ids`` under ``logits`` ``[V]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    return float(probs[list(token_ids)].sum())


@dataclass
class TextDecoder:
    """Incremental detokenisation: text for each new token, holding back incomplete characters.

    Decodes a short window of recent tokens so that tokenizers whose pieces depend on their
    neighbours (SentencePiece spaces, byte fallback) produce the same text as one decode of all.
    """

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # window start
    read: int = 0  # tokens already turned into text

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
