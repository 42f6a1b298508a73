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

TINY_VERSION = 4
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
    tokenizer = build_sentencepiece(cache_dir() / "asr" / f"spm{LARGE_VOCAB}-v1", LARGE_VOCAB,
                                    n_sentences=30000)
    model = _build(arch.LARGE, "hybrid", tokenizer, seed=0)
    _shape_outputs(model)  # a realistic label rate: the decoding cost depends on it
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
    return arch.model_class(head)(cfg=OmegaConf.create(cfg)).eval()


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


def _shape_outputs(model, *, spread: float = 3.0, pred_spread: float = 0.3, label_share: float = 0.3,
                   label_rate: float = 0.3, ctc_share: float = 0.25, end_share: float = 0.02,
                   end_rate: float = 0.2,
                   states: int = 64) -> None:
    """Make the random output heads follow the audio, with a realistic share of blanks.

    The random encoder's output varies little over time next to its per-channel offsets, so each
    head's input projection is centred and scaled over a calibration signal, run at every attention
    context the model is built for (its frames then vary by ``spread``), and so is the RNNT
    prediction network's output over the labels (so emitting a label changes what comes next). Then
    the biases are set so that greedy RNNT decoding of those frames emits about ``label_rate`` labels
    per frame (speech gives a few tokens a second: 0.2-0.4 per 80 ms frame) and end-of-utterance
    labels about ``end_rate`` per frame of the calibration signal (real speech gets far fewer: about
    one every two seconds on JFK), and CTC has ``ctc_share`` non-blank frames and ends in
    ``end_share`` of them.
    """
    import torch

    vocab = model.tokenizer.vocab_size
    ends = [i for i in range(vocab) if model.tokenizer.ids_to_tokens([i])[0] in EOU_SYMBOLS]
    words = [i for i in range(vocab) if i not in ends]  # labels that are neither blank nor an end
    clip = calibration_audio()
    audio = torch.from_numpy(np.concatenate([clip * g for g in (0.5, 1.0, 2.0)]))[None]
    encoder = model.encoder
    with torch.no_grad():
        mel, n = model.preprocessor(input_signal=audio, length=torch.tensor([audio.size(1)]))
        frames = []
        for context in encoder.att_context_size_all:
            encoder.set_default_att_context_size(list(context))
            frames.append(encoder(audio_signal=mel, length=n)[0][0].T)
        encoder.set_default_att_context_size(list(encoder.att_context_size_all[0]))
        x = torch.cat(frames)  # [T, D]: every frame at every context
        if hasattr(model, "joint"):
            joint = model.joint
            _standardise(joint.enc, x, spread)
            labels = torch.linspace(0, vocab, min(states, vocab + 1)).round().long().unsqueeze(1)
            g, _ = model.decoder.predict(labels, None, add_sos=False, batch_size=labels.size(0))  # [K, 1, H]
            _standardise(joint.pred, g[:, 0], pred_spread)
            f = joint.project_encoder(x[None])  # [1, T, H]
            logits = joint.joint_after_projection(f, joint.project_prednet(g.transpose(0, 1)))[0].flatten(0, 1)
            bias = joint.joint_net[-1].bias
            encoded = torch.stack(frames).transpose(1, 2)  # [contexts, D, T]
            saved = bias[ends].clone()
            bias[ends] = -1e4  # out of the way while the blank bias is set
            guess = _quantile(logits[:, words].max(dim=-1).values - logits[:, vocab], 1 - label_share)
            bias[vocab] += _rate_bias(model, encoded, [vocab], None, guess, label_rate, fewer_when_higher=True)
            bias[ends] = saved
            if ends:
                logits = joint.joint_after_projection(f, joint.project_prednet(g.transpose(0, 1)))[0].flatten(0, 1)
                best = logits[:, words + [vocab]].max(dim=-1).values
                guess = max(_quantile(best - logits[:, i], end_share) for i in ends)
                bias[ends] += _rate_bias(model, encoded, ends, ends, guess, end_rate, fewer_when_higher=False)
        ctc = getattr(model, "ctc_decoder", None)
        if ctc is not None:
            conv = ctc.decoder_layers[-1]
            _standardise(conv, x, spread)
            logits = ctc(encoder_output=x.T[None])[0]  # [T, V+1]
            shift = _quantile(logits[:, words].max(dim=-1).values - logits[:, vocab], 1 - ctc_share)
            conv.bias[vocab] += shift
            logits[:, vocab] += shift
            _end_biases(conv.bias, logits, words + [vocab], ends, end_share)


def tune_label_rate(model, rate: float = 0.3) -> float:
    """Re-set a random model's blank bias so that, at the encoder's current attention context, greedy
    decoding of the calibration signal emits about ``rate`` labels per frame; returns the rate got.

    Random encoders give very different outputs at different contexts, so a benchmark tunes this per
    context: decoding cost depends on how many labels come out, and real speech gives 0.2-0.4 per
    frame.
    """
    import torch

    from duplex.asr.decoding import RNNTGreedy

    audio = torch.from_numpy(calibration_audio())[None].to(next(model.parameters()).device)
    with torch.no_grad():
        mel, n = model.preprocessor(input_signal=audio, length=torch.tensor([audio.size(1)], device=audio.device))
        encoded, _ = model.encoder(audio_signal=mel.to(next(model.parameters()).dtype), length=n)
        blank = model.tokenizer.vocab_size
        bias = model.joint.joint_net[-1].bias
        bias[blank] += _rate_bias(model, encoded, [blank], None, 0.0, rate, fewer_when_higher=True)
        decoder = RNNTGreedy(model.decoder, model.joint, max_symbols=int(model.cfg.decoding.greedy.max_symbols),
                             reset_ids=(), capacity=1, device=str(audio.device), dtype=encoded.dtype)
        found, _ = decoder.decode(encoded, torch.zeros(1, dtype=torch.int64, device=audio.device),
                                  torch.ones(1, encoded.size(2), dtype=torch.bool, device=audio.device))
    return len(found[0]) / encoded.size(2)


def _rate_bias(model, encoded, shifted: list[int], counted: list[int] | None, guess: float, rate: float,
               *, fewer_when_higher: bool, iterations: int = 12, skip: int = 20) -> float:
    """The shift of the biases of labels ``shifted`` (near ``guess``) at which greedy decoding of
    ``encoded`` [B, D, T] emits labels in about ``rate`` of the frames, counting the labels in
    ``counted`` (all if None): a bisection, decoding with our own batched greedy decoder, end labels
    resetting the decoder as they do live. Frames are counted once however many labels they emit,
    and the first ``skip`` frames not at all: a random encoder's first frames stand out, and counting
    their bursts let the labels all land there, leaving the rest of any real input blank."""
    import torch

    from duplex.asr.decoding import RNNTGreedy

    bias = model.joint.joint_net[-1].bias
    vocab = model.tokenizer.vocab_size
    ends = [i for i in range(vocab) if model.tokenizer.ids_to_tokens([i])[0] in EOU_SYMBOLS]
    max_symbols = int(model.cfg.decoding.greedy.get("max_symbols", 10))
    device = encoded.device
    slots = torch.arange(encoded.size(0), device=device)
    valid = torch.ones(encoded.size(0), encoded.size(2), dtype=torch.bool, device=device)
    lo, hi = guess - 10.0, guess + 10.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        bias[shifted] += mid
        decoder = RNNTGreedy(model.decoder, model.joint, max_symbols=max_symbols, reset_ids=ends,
                             capacity=encoded.size(0), device=str(device), dtype=encoded.dtype)
        found, _ = decoder.decode(encoded, slots, valid)
        bias[shifted] -= mid
        emitted = len({(b, t) for b, tokens in enumerate(found) for t, k in tokens
                       if t >= skip and (counted is None or k in counted)})
        too_many = emitted > rate * encoded.size(0) * max(1, encoded.size(2) - skip)
        lo, hi = (mid, hi) if too_many == fewer_when_higher else (lo, mid)
    return (lo + hi) / 2


def _end_biases(bias, logits, others: list[int], ends: list[int], share: float) -> None:
    """End-of-utterance labels beat every other label (blank included) in ``share`` of ``logits`` rows."""
    best = logits[:, others].max(dim=-1).values
    for i in ends:
        bias[i] += _quantile(best - logits[:, i], share)


def _quantile(values, q: float) -> float:
    """The ``q`` quantile of a 1-D tensor (torch.quantile refuses large inputs)."""
    import torch

    k = min(values.numel(), max(1, int(round(q * values.numel()))))
    return float(torch.kthvalue(values.flatten().float(), k).values)


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
