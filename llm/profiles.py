"""``build_llm``: the dialogue LM of each model profile.

- ``pretrained``: Qwen/Qwen2.5-1.5B-Instruct (or ``config.llm_model``: a folder or a hub name) from a
  local folder or the local Hugging Face cache;
- ``tiny``: a tiny random Qwen2 (``config.llm_model`` may say ``llama``, or give a folder), built once
  under ``cache_dir()`` and loaded back through the same loader;
- ``random``: a full-size architecture (``qwen2.5-1.5b`` by default, or ``qwen2.5-0.5b``) with random
  weights and the tiny tokenizer, for speed measurements (the sampler never picks ids the tokenizer
  lacks).
"""

from __future__ import annotations

from typing import Any

from duplex.config import AgentConfig
from duplex.errors import ConfigError

PRETRAINED = "Qwen/Qwen2.5-1.5B-Instruct"

# Full-size configurations, written here so that nothing comes from the hub.
_QWEN25 = dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643,
               eos_token_id=151645, use_sliding_window=False)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}
_HUB_NAMES = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b", "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b"}
DEFAULT_RANDOM = "qwen2.5-1.5b"


def settings_from(config: AgentConfig):
    from duplex.llm.model import LLMSettings

    assert config.max_reply_tokens is not None  # AgentConfig.__post_init__ resolved the profile's default
    return LLMSettings(window=config.llm_window, max_reply_tokens=config.max_reply_tokens,
                       temperature=config.temperature, seed=config.seed, fixed_length=config.fixed_lengths)


def random_model(arch: str, device: str, *, seed: int = 0) -> Any:
    """A full-size ``arch`` model with random weights, built directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from duplex.llm.loader import model_dtype

    name = _HUB_NAMES.get(arch, arch).lower()
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown LLM architecture {arch!r} for the random profile; choose one of "
                          f"{', '.join(ARCHITECTURES)}")
    config = Qwen2Config(**ARCHITECTURES[name])
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype(device))
    return model.eval()


def load_model(config: AgentConfig, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for ``config.profile``."""
    from duplex.llm.loader import load_checkpoint
    from duplex.llm.tiny import ARCHS, tiny_model_path

    if config.profile == "tiny":
        choice = config.llm_model or "qwen2"
        return load_checkpoint(str(tiny_model_path(choice)) if choice in ARCHS else choice, device)
    if config.profile == "random":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2"), local_files_only=True)
        return random_model(config.llm_model or DEFAULT_RANDOM, device, seed=config.seed), tokenizer
    if config.profile == "pretrained":
        return load_checkpoint(config.llm_model or PRETRAINED, device)
    raise ConfigError(f"the LLM has no {config.profile!r} profile here")


def build_llm(config: AgentConfig, device: str):
    """The :class:`~duplex.llm.model.SinkLLM` of ``config`` on ``device`` (blocking)."""
    from duplex.llm.model import SinkLLM

    model, tokenizer = load_model(config, device)
    llm = SinkLLM(model, tokenizer, device, settings_from(config), slots=config.slots(), graphs=config.graphs,
                   compile=config.compile)
    llm.check_system_prompt(config.system_prompt)
    return llm
