"""build_tts for each profile: the tiny checkpoint round trip, local pretrained folders, and clear errors
for missing or unsupported models (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from duplex.config import AgentConfig
from duplex.errors import ConfigError, ModelNotFoundError
from duplex.profiles import build_stage
from duplex.tts.loading import load_checkpoint, tiny_checkpoint
from duplex.tts.profiles import build_tts
from tts_fixtures import one_torch_thread, collect, tiny_tts_checkpoint  # noqa: F401


def test_tiny_checkpoint_round_trips(tiny_tts_checkpoint):
    """The tiny model is saved with save_pretrained and loads back with identical weights and buffers
    (codebooks included), in fp32 on the CPU."""
    path = tiny_checkpoint()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    model, _ = tiny_tts_checkpoint
    again, _ = load_checkpoint(path, "cpu")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert next(again.parameters()).dtype == torch.float32


async def test_build_tts_tiny_uses_the_config():
    """The profile table builds the tiny TTS with the config's chunk size and seed, and it speaks."""
    config = AgentConfig(profile="tiny", device="cpu", tts_chunk_frames=3, seed=7).validate()
    tts = build_stage("tts", config, "cpu")
    try:
        assert callable(tts.new_stream) and tts.sample_rate == 24_000
        assert (tts.settings.chunk_frames, tts.settings.seed) == (3, 7)
        tts.settings.seconds_per_char = 0.02
        chunks = await collect(tts.new_stream(), "Hi there.")
        assert all(len(c.pcm) <= 3 * 1920 for c in chunks) and sum(len(c.pcm) for c in chunks) > 0
    finally:
        await tts.aclose()


def test_pretrained_loads_a_local_folder():
    """--tts-model may name a local checkpoint folder (here the tiny one) for the pretrained profile."""
    tts = build_tts(AgentConfig(profile="pretrained", tts_model=str(tiny_checkpoint())), "cpu")
    tts.close()
    assert tts.engine.num_codebooks == 8


def test_missing_pretrained_model_is_a_clear_error(tmp_path):
    """A hub name not in the local cache, or a folder that is no checkpoint: ModelNotFoundError naming
    the model and `duplex models pull`; no download is attempted."""
    with pytest.raises(ModelNotFoundError, match=r"nobody/no-such-csm .*duplex models pull"):
        build_tts(AgentConfig(profile="pretrained", tts_model="nobody/no-such-csm"), "cpu")
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        build_tts(AgentConfig(profile="pretrained", tts_model=str(tmp_path)), "cpu")


def test_random_profile_builds_csm_1b_only():
    """The random profile is the CSM-1B architecture; another name is refused before anything is built."""
    with pytest.raises(ConfigError, match="csm-1b only"):
        build_tts(AgentConfig(profile="random", tts_model="some/other-tts"), "cpu")


def test_full_size_configs_match_csm_1b():
    """The random profile's configs are CSM-1B's: a 2048-wide 16-layer backbone, a 1024-wide 4-layer depth
    decoder, 32 codebooks of 2048 codes on a 12.5 Hz Mimi with a 250-step window (no weights built)."""
    from duplex.tts.configs import csm_1b_config

    cfg = csm_1b_config()
    backbone = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert backbone == (2048, 16, 32, 8)
    depth = cfg.depth_decoder_config
    assert (depth.hidden_size, depth.num_hidden_layers, depth.num_codebooks) == (1024, 4, 32)
    codec = cfg.codec_config
    assert (codec.num_quantizers, codec.codebook_size, codec.frame_rate, codec.frame_size) == (32, 2048, 12.5, 1920)
    assert codec.sliding_window == 250 and cfg.vocab_size == 2051 and cfg.text_vocab_size == 128256
