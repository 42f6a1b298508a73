"""build_llm for each profile: tiny checkpoints through the real loader, full-size architectures
written in our code, and clear errors for missing checkpoints."""

from __future__ import annotations

import pytest

from duplex.config import AgentConfig
from duplex.errors import ModelNotFoundError
from duplex.llm.model import SinkLLM
from duplex.llm.profiles import ARCHITECTURES, build_llm, random_model
from duplex.llm.tiny import tiny_model_path
from duplex.stages import LLMStream, Message
from llm_fixtures import single_torch_thread  # noqa: F401 (fixture)


@pytest.mark.parametrize("choice", ["qwen2", "llama"])
async def test_tiny_profile_builds_a_working_llm(choice):
    """The tiny profile loads the saved checkpoint (Qwen2 by default, Llama on request) with the
    agent's settings, and its stream fulfils the LLMStream contract end to end."""
    config = AgentConfig(profile="tiny", llm_model=None if choice == "qwen2" else choice, llm_window=512,
                         max_reply_tokens=8, seed=3).validate()
    llm = build_llm(config, "cpu")
    try:
        assert isinstance(llm, SinkLLM)
        assert llm.engine.model.config.model_type == choice
        assert (llm.settings.window, llm.settings.max_reply_tokens, llm.settings.seed) == (512, 8, 3)
        stream = llm.new_stream(config.system_prompt)
        assert isinstance(stream, LLMStream)
        msgs = [Message("user", "hello")]
        p = await stream.listen(msgs)
        assert 0.0 <= p <= 1.0
        text = "".join([piece async for piece in stream.reply(msgs)])
        assert isinstance(text, str)
        await stream.aclose()
    finally:
        llm.close()


def test_tiny_checkpoint_is_a_saved_pretrained_folder():
    """The tiny checkpoint is a save_pretrained folder with weights, config, tokenizer and template."""
    path = tiny_model_path("qwen2")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file()
    assert tiny_model_path("qwen2") == path  # built once, then reused


def test_missing_pretrained_checkpoint_says_how_to_fetch_it(tmp_path):
    """A hub name absent from the local cache, or a folder without a model, is a ModelNotFoundError
    naming the model and `duplex models pull`; nothing is downloaded."""
    config = AgentConfig(profile="pretrained", llm_model="nobody-here/no-such-model", device="cpu")
    with pytest.raises(ModelNotFoundError, match="nobody-here/no-such-model.*duplex models pull"):
        build_llm(config, "cpu")
    config.llm_model = str(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        build_llm(config, "cpu")


@pytest.mark.parametrize(("arch", "params"), [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304)])
def test_random_profile_architectures_are_full_size(arch, params):
    """The random profile's configurations are the real Qwen2.5 sizes (parameter counts of the
    published checkpoints), built here on the meta device without allocating weights."""
    assert arch in ARCHITECTURES
    model = random_model(arch, "meta")
    assert sum(p.numel() for p in model.parameters()) == params
