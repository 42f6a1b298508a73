"""ASR models built in-process from our configs: tiny (saved and cached) and full-size random.

Tiny models are built once, written with NeMo's ``save_to`` under ``cache_dir()/asr/<variant>-v<N>``
and always loaded back through :func:`duplex.asr.loading.load_nemo`, the loader real checkpoints
use. Bump :data:`TINY_VERSION` whenever what they are built from changes.

Random weights say nothing about which label wins, so the tiny models' output biases are set to give
a realistic mix: mostly blanks, a token now and then, and (for the EOU variant) an end-of-utterance
token once in a while. The weights stay random.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from duplex.config import cache_dir
from duplex.errors import ConfigError
from duplex.asr import architectures as arch
from duplex.asr.tokenizer import build_sentencepiece

TINY_VERSION = 1
TINY_VARIANTS: dict[str, arch.Head] = {
    "tiny": "hybrid",  # RNNT + auxiliary CTC, SentencePiece vocabulary
    "tiny-eou": "rnnt_eou",  # RNNT with <EOU>/<EOB> tokens, like nvidia/parakeet_realtime_eou_120m-v1
}
LARGE_VOCAB = 1024
EOU_SYMBOLS = ("<EOU>", "<EOB>")


def tiny_model_path(variant: str = "tiny") -> Path:
    """The cached ``.nemo`` file of a tiny variant, built on first use."""
    if variant not in TINY_VARIANTS:
        raise ConfigError(f"unknown tiny ASR variant {variant!r}; choose one of {', '.join(TINY_VARIANTS)}")
    root = cache_dir() / "asr" / f"{variant}-v{TINY_VERSION}"
    path = root / "model.nemo"
    if path.is_file():
        return path
    head = TINY_VARIANTS[variant]
    symbols = EOU_SYMBOLS if head == "rnnt_eou" else ()
    tokenizer = build_sentencepiece(root / "tokenizer", 64, user_symbols=symbols)
    model = _build(arch.TINY, head, tokenizer, seed=1234, max_symbols=3)
    _shape_outputs(model)
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".nemo", dir=root)
    os.close(fd)
    try:
        model.save_to(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def build_random_large(device: str = "cpu"):
    """FastConformer large hybrid streaming (~114M) with random weights (not saved: speed tests)."""
    tokenizer = build_sentencepiece(cache_dir() / "asr" / f"spm{LARGE_VOCAB}-v{TINY_VERSION}", LARGE_VOCAB,
                                    n_sentences=30000)
    model = _build(arch.LARGE, "hybrid", tokenizer, seed=0)
    return model.to(device).eval()


def _build(size: arch.EncoderSize, head: arch.Head, tokenizer: Path, *, seed: int, max_symbols: int = 10):
    from duplex.asr.loading import quiet_nemo

    quiet_nemo()
    import torch
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    cfg = arch.fastconformer_config(size, head, str(tokenizer))
    if "decoding" in cfg and "greedy" in cfg["decoding"]:
        cfg["decoding"]["greedy"]["max_symbols"] = max_symbols
    cfg = OmegaConf.create(cfg)
    return arch.model_class(head)(cfg=cfg).eval()


def calibration_audio(seconds: float = 6.0, rate: int = 16000, seed: int = 7):
    """Deterministic speech-like test signal: voiced harmonic bursts, noise bursts and pauses."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate), dtype=np.float32)
    pos = 0
    while pos < out.size:
        n = int(rng.uniform(0.05, 0.3) * rate)
        kind = rng.integers(3)
        t = np.arange(min(n, out.size - pos)) / rate
        if kind == 0:  # voiced: harmonics of a gliding pitch
            f0 = rng.uniform(90, 250) * (1 + 0.3 * t / max(t[-1], 1e-3) * rng.uniform(-1, 1))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            seg = sum(np.sin(k * phase) / k for k in range(1, 12))
        elif kind == 1:  # fricative noise
            seg = rng.standard_normal(t.size) * rng.uniform(0.2, 1.0)
        else:  # pause
            seg = np.zeros(t.size)
        out[pos:pos + t.size] = 0.3 * seg * np.hanning(t.size)
        pos += t.size
    out += 0.003 * rng.standard_normal(out.size)  # a room's noise floor: real input is never digital zero
    return out.astype(np.float32)


def _shape_outputs(model, *, spread: float = 3.0, pred_spread: float = 0.3, rnnt_rate: float = 0.5, ctc_share: float = 0.25,
                   end_share: float = 0.02) -> None:
    """Make the random output heads follow the audio, with a realistic share of blanks.

    The random encoder's output varies little over time next to its per-channel offsets, so each
    head's input projection is centred and scaled over a calibration signal (its frames then vary
    by ``spread``), and so is the RNNT prediction network's (so emitting a label changes what comes
    next). Then the blank bias is set so that greedy RNNT decoding of the calibration signal emits
    about ``rnnt_rate`` labels per frame and CTC about ``ctc_share`` non-blank frames; the
    end-of-utterance labels win about ``end_share`` of the frames.
    """
    import torch

    vocab = model.tokenizer.vocab_size
    ends = [i for i in range(vocab) if model.tokenizer.ids_to_tokens([i])[0] in EOU_SYMBOLS]
    clip = calibration_audio()
    audio = torch.from_numpy(np.concatenate([clip * g for g in (0.5, 1.0, 2.0)]))[None]
    with torch.no_grad():
        mel, n = model.preprocessor(input_signal=audio, length=torch.tensor([audio.size(1)]))
        enc, n = model.encoder(audio_signal=mel, length=n)  # [1, D, T]
        frames = enc.size(2)
        if hasattr(model, "joint"):
            joint, decoder = model.joint, model.decoder
            _standardise(joint.enc, enc[0].T, spread)
            labels = torch.arange(vocab + 1).unsqueeze(1)  # every label after the start state
            g, _ = decoder.predict(labels, None, add_sos=False, batch_size=vocab + 1)
            _standardise(joint.pred, g[:, 0], pred_spread)
            bias = joint.joint_net[-1].bias
            for i in ends:
                bias[i] -= 1e4  # out of the way while the blank bias is searched
            lo, hi = -50.0, 50.0
            for _ in range(30):  # bisection: more blank bias, fewer labels
                mid = (lo + hi) / 2
                bias[vocab] += mid
                hyp = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=n,
                                                                     return_hypotheses=True)[0]
                bias[vocab] -= mid
                lo, hi = (mid, hi) if len(hyp.y_sequence) > rnnt_rate * frames else (lo, mid)
            bias[vocab] += (lo + hi) / 2
            for i in ends:
                bias[i] += 1e4
            # end-of-utterance labels: win about end_share of the frames from the start state
            f = joint.project_encoder(enc.transpose(1, 2))
            logits = joint.joint_after_projection(f, joint.project_prednet(g[-1:]))[0, :, 0]  # [T, V+1]
            others = [i for i in range(vocab + 1) if i not in ends]
            top = logits[:, others].max(dim=-1).values
            for i in ends:
                bias[i] += torch.quantile(top - logits[:, i], end_share)
        ctc = getattr(model, "ctc_decoder", None)
        if ctc is not None:
            conv = ctc.decoder_layers[-1]
            _standardise(conv, enc[0].T, spread)
            logits = ctc(encoder_output=enc)[0]
            best = logits[:, :vocab].max(dim=-1).values
            conv.bias[vocab] += torch.quantile(best - logits[:, vocab], 1 - ctc_share)
            others = [i for i in range(vocab + 1) if i not in ends]
            for i in ends:
                conv.bias[i] += torch.quantile(logits[:, others].max(dim=-1).values - logits[:, i], end_share)


def _standardise(layer, x, spread: float) -> None:
    """Rescale ``layer`` (Linear or 1x1 Conv1d) so its outputs on rows of ``x`` [T, D] are centred and
    vary by ``spread`` over time."""
    import torch

    weight = layer.weight.view(layer.weight.size(0), -1)  # [out, D]
    y = x @ weight.T + layer.bias  # [T, out]
    scale = spread / y.std(dim=0).mean().clamp_min(1e-6)
    with torch.no_grad():
        layer.bias.copy_((layer.bias - y.mean(dim=0)) * scale)
        layer.weight.mul_(scale)
