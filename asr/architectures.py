"""NeMo model configs written in our code: the full-size cache-aware FastConformer and tiny versions.

``fastconformer_config`` returns the ``model`` section NeMo builds an ASR model from. The full-size
one matches nvidia/stt_en_fastconformer_hybrid_large_streaming_multi (17 layers, d_model 512, 8x
depth-wise striding causal subsampling, chunked-limited attention trained for the four latencies
[70,13] [70,6] [70,1] [70,0], causal convolutions of kernel 9, RNNT + auxiliary CTC heads, 1024
SentencePiece tokens: about 114M parameters). The tiny one keeps every streaming property (the same
mel front end, subsampling, attention contexts and caches) with a few thousand weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Head = Literal["hybrid", "rnnt", "ctc", "rnnt_eou"]

#: The attention contexts [left, right] the streaming FastConformers are trained for, longest first
#: (NeMo's default context is the first one).
ATT_CONTEXTS: list[list[int]] = [[70, 13], [70, 6], [70, 1], [70, 0]]


@dataclass(frozen=True)
class EncoderSize:
    n_layers: int
    d_model: int
    n_heads: int
    subsampling_channels: int
    ff_expansion: int
    pred_hidden: int
    joint_hidden: int


LARGE = EncoderSize(n_layers=17, d_model=512, n_heads=8, subsampling_channels=256, ff_expansion=4,
                    pred_hidden=640, joint_hidden=640)
TINY = EncoderSize(n_layers=2, d_model=32, n_heads=2, subsampling_channels=16, ff_expansion=2,
                   pred_hidden=32, joint_hidden=32)


def preprocessor_config() -> dict[str, Any]:
    """The log-mel front end of NeMo's streaming FastConformers (no normalisation: streamable)."""
    return {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": 16000,
        "normalize": "NA",
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": 80,
        "n_fft": 512,
        "log": True,
        "frame_splicing": 1,
        "dither": 1e-5,
        "pad_to": 0,
        "pad_value": 0.0,
    }


def encoder_config(size: EncoderSize, feat_in: int = 80) -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": feat_in,
        "feat_out": -1,
        "n_layers": size.n_layers,
        "d_model": size.d_model,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": size.subsampling_channels,
        "causal_downsampling": True,
        "ff_expansion_factor": size.ff_expansion,
        "self_attention_model": "rel_pos",
        "n_heads": size.n_heads,
        "att_context_size": [list(c) for c in ATT_CONTEXTS],
        "att_context_probs": None,
        "att_context_style": "chunked_limited",
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "layer_norm",
        "conv_context_size": "causal",
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    }


def _rnnt_sections(size: EncoderSize) -> dict[str, Any]:
    return {
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {"pred_hidden": size.pred_hidden, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.0},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "fused_batch_size": 4,
            "jointnet": {"joint_hidden": size.joint_hidden, "activation": "relu", "dropout": 0.2},
        },
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "default"},
    }


def _ctc_decoder() -> dict[str, Any]:
    return {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": None, "num_classes": -1,
            "vocabulary": []}


def fastconformer_config(size: EncoderSize, head: Head, tokenizer_dir: str) -> dict[str, Any]:
    """The ``model`` config of a cache-aware streaming FastConformer with a SentencePiece vocabulary."""
    cfg: dict[str, Any] = {
        "sample_rate": 16000,
        "log_prediction": False,
        "compute_eval_loss": False,
        "skip_nan_grad": False,
        "model_defaults": {"enc_hidden": size.d_model, "pred_hidden": size.pred_hidden,
                           "joint_hidden": size.joint_hidden},
        "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
        "preprocessor": preprocessor_config(),
        "encoder": encoder_config(size),
        "optim": None,
    }
    if head in ("hybrid", "rnnt", "rnnt_eou"):
        cfg.update(_rnnt_sections(size))
    if head == "hybrid":
        cfg["aux_ctc"] = {"ctc_loss_weight": 0.3, "use_cer": False, "ctc_reduction": "mean_volume",
                          "decoder": _ctc_decoder(), "decoding": {"strategy": "greedy"}}
    if head == "ctc":
        cfg["decoder"] = _ctc_decoder()
        cfg["decoder"]["feat_in"] = size.d_model
        cfg["decoding"] = {"strategy": "greedy"}
    return cfg


def model_class(head: Head):
    """The NeMo model class for a head (imports NeMo)."""
    from nemo.collections.asr import models

    if head == "hybrid":
        return models.EncDecHybridRNNTCTCBPEModel
    if head == "rnnt":
        return models.EncDecRNNTBPEModel
    if head == "ctc":
        return models.EncDecCTCModelBPE
    from nemo.collections.asr.models.asr_eou_models import EncDecRNNTBPEEOUModel

    return EncDecRNNTBPEEOUModel
