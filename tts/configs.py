"""Architectures of the TTS profiles, written here so nothing comes from the hub.

- :func:`csm_1b_config`: CSM-1B (Llama-3.2-1B-style backbone, 4-layer depth decoder, 32 codebooks)
  on the Mimi codec, as ``sesame/csm-1b`` and ``kyutai/mimi`` define them: the ``random`` profile.
- :func:`tiny_config`: the same architecture, tiny: 8 codebooks of 64 codes, a 2-layer backbone, and
  a Mimi with the real strides (24 kHz, 12.5 Hz frames of 1920 samples) but few channels and an
  8-step attention window, so the window bound is exercised within a couple of seconds.
- :func:`build_byte_tokenizer`: a byte-level tokenizer built locally (no merges), with CSM's
  special tokens, for the ``tiny`` and ``random`` profiles.
"""

from __future__ import annotations

from typing import Any

LLAMA3_ROPE_BACKBONE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 0.5,
                        "low_freq_factor": 0.125, "original_max_position_embeddings": 1024}
LLAMA3_ROPE_DEPTH = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                     "high_freq_factor": 0.0078125, "low_freq_factor": 0.001953125,
                     "original_max_position_embeddings": 16}

# special tokens of the byte tokenizer: after the 256 byte symbols
BOS, EOS, AUDIO, AUDIO_EOS = "<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>"
BYTE_VOCAB = 256 + 4


def mimi_kwargs() -> dict[str, Any]:
    """``kyutai/mimi`` as CSM uses it (all 32 codebooks)."""
    return dict(sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=512, num_filters=64,
                num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3,
                residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant",
                compress=2, trim_right_ratio=1.0, codebook_size=2048, codebook_dim=256, num_quantizers=32,
                use_conv_shortcut=False, vector_quantization_hidden_dimension=256, num_semantic_quantizers=1,
                upsample_groups=512, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=8,
                num_key_value_heads=8, head_dim=64, hidden_act="gelu", max_position_embeddings=8000,
                norm_eps=1e-5, use_cache=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                sliding_window=250, layer_scale_initial_scale=0.01, attention_bias=False)


def csm_1b_config(text_vocab_size: int = 128256, token_ids: dict[str, int] | None = None):
    """Full-size CSM-1B + Mimi."""
    from transformers import CsmConfig, CsmDepthDecoderConfig, MimiConfig

    ids = token_ids or {"bos": 128000, "audio": 128002, "audio_eos": 128003}
    depth = CsmDepthDecoderConfig(num_codebooks=32, backbone_hidden_size=2048, vocab_size=2051, hidden_size=1024,
                                  intermediate_size=8192, num_hidden_layers=4, num_attention_heads=8,
                                  num_key_value_heads=2, max_position_embeddings=33,
                                  rope_parameters=dict(LLAMA3_ROPE_DEPTH))
    return CsmConfig(num_codebooks=32, vocab_size=2051, text_vocab_size=text_vocab_size, hidden_size=2048,
                     intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=2048, rope_parameters=dict(LLAMA3_ROPE_BACKBONE),
                     pad_token_id=ids["audio"], codebook_pad_token_id=2050, codebook_eos_token_id=0,
                     bos_token_id=ids["bos"], audio_token_id=ids["audio"], audio_eos_token_id=ids["audio_eos"],
                     depth_decoder_config=depth.to_dict(), codec_config=MimiConfig(**mimi_kwargs()).to_dict())


def tiny_config(token_ids: dict[str, int]):
    """A tiny CSM + Mimi with the real time base (24 kHz, 1920-sample frames)."""
    from transformers import CsmConfig, CsmDepthDecoderConfig, MimiConfig

    codebooks, codes = 8, 64
    mimi = dict(mimi_kwargs(), hidden_size=32, num_filters=8, codebook_size=codes, codebook_dim=16,
                num_quantizers=codebooks, vector_quantization_hidden_dimension=16, upsample_groups=32,
                num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                head_dim=8, sliding_window=8, max_position_embeddings=4000,
                layer_scale_initial_scale=0.5)  # trained scales are far above the 0.01 init: let attention count
    depth = CsmDepthDecoderConfig(num_codebooks=codebooks, backbone_hidden_size=64, vocab_size=codes + 3,
                                  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=codebooks + 1,
                                  rope_parameters=dict(LLAMA3_ROPE_DEPTH, original_max_position_embeddings=4))
    return CsmConfig(num_codebooks=codebooks, vocab_size=codes + 3, text_vocab_size=BYTE_VOCAB, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=2048, rope_parameters=dict(LLAMA3_ROPE_BACKBONE),
                     pad_token_id=token_ids["audio"], codebook_pad_token_id=codes + 2, codebook_eos_token_id=0,
                     bos_token_id=token_ids["bos"], audio_token_id=token_ids["audio"],
                     audio_eos_token_id=token_ids["audio_eos"], depth_decoder_config=depth.to_dict(),
                     codec_config=MimiConfig(**mimi).to_dict())


def build_byte_tokenizer():
    """A byte-level tokenizer (every UTF-8 byte one token) with CSM's special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    assert len(vocab) == 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS)
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO, AUDIO_EOS]})
    tokenizer.pad_token = EOS
    assert len(tokenizer) == BYTE_VOCAB, len(tokenizer)
    return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
    """The ids CSM needs from a tokenizer (Llama-3's for ``sesame/csm-1b``, the byte tokenizer's here)."""
    return {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "audio": tokenizer.convert_tokens_to_ids(AUDIO), "audio_eos": tokenizer.convert_tokens_to_ids(AUDIO_EOS)}
