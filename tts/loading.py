"""Loading CSM + Mimi checkpoints, and building the tiny and random ones.

Every profile ends in :func:`load_checkpoint` or :func:`prepare`: the ``tiny`` model is built once,
saved with ``save_pretrained`` under :func:`duplex.config.cache_dir` and loaded back through the same
loader real checkpoints use; ``random`` builds the full-size architecture in memory; ``pretrained``
loads ``sesame/csm-1b`` (or ``config.tts_model``) from a local folder or the Hugging Face cache, never
from the network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from duplex.config import cache_dir
from duplex.errors import ModelNotFoundError

PRETRAINED_TTS = "sesame/csm-1b"
TINY_NAME = "tts-tiny-csm-v3"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' config chatter and progress bars while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def dtype_for(device: str):
    """bf16 on a GPU, fp32 on the CPU (for the language model; the codec always runs in fp32)."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def fill_codebooks(codec, seed: int = 0) -> None:
    """Give every Mimi codebook random centroids (an all-zero codebook decodes every code alike)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in codec.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
            elif name.endswith("codebook.cluster_usage"):
                buffer.fill_(1.0)
    reset_codebook_cache(codec)


def reset_codebook_cache(codec) -> None:
    """Mimi caches ``embed_sum / cluster_usage`` on first use; drop it after moving or changing weights."""
    for module in codec.modules():
        if hasattr(module, "_embed") and hasattr(module, "embed_sum"):
            module._embed = None


def prepare(model, device: str):
    """Put a CSM on ``device`` for inference: LM in bf16 on GPU / fp32 on CPU, codec in fp32."""
    import torch

    model.eval()
    model.to(device=device, dtype=dtype_for(device))
    model.codec_model.to(dtype=torch.float32)
    reset_codebook_cache(model.codec_model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_checkpoint(path: str | Path, device: str, *, local_only: bool = True):
    """Load a CSM checkpoint (folder or hub name, local files only) and its tokenizer."""
    from transformers import AutoTokenizer, CsmForConditionalGeneration

    with quiet_transformers():
        model = CsmForConditionalGeneration.from_pretrained(str(path), local_files_only=local_only,
                                                            dtype=dtype_for(device))
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local_only)
    return prepare(model, device), tokenizer


def load_pretrained(name_or_path: str | None, device: str):
    """The ``pretrained`` profile: a local folder, or a hub name already in the local HF cache."""
    name = name_or_path or PRETRAINED_TTS
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"TTS model folder {local} has no config.json; point --tts-model at a "
                                     f"saved CSM checkpoint (e.g. a snapshot of {PRETRAINED_TTS})")
        return load_checkpoint(local, device)
    try:
        return load_checkpoint(name, device)
    except OSError as exc:
        raise ModelNotFoundError(f"TTS model {name} is not in the local Hugging Face cache; fetch it with "
                                 f"`duplex models pull` (it needs access to the gated {name} repository), or "
                                 f"pass a local folder with --tts-model") from exc


def tiny_checkpoint() -> Path:
    """The tiny random CSM + Mimi + byte tokenizer, built once and saved under the cache dir."""
    path = cache_dir() / TINY_NAME
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    import torch
    from transformers import CsmForConditionalGeneration

    from duplex.tts.configs import build_byte_tokenizer, tiny_config, token_ids

    tokenizer = build_byte_tokenizer()
    with quiet_transformers():
        torch.manual_seed(0)
        model = CsmForConditionalGeneration(tiny_config(token_ids(tokenizer)))
        fill_codebooks(model.codec_model, seed=0)
        with torch.no_grad():  # random decoders are loud (peaks ~50): bring the babble near [-1, 1]
            model.codec_model.decoder.decoder_seanet.layers[-1].conv.weight.mul_(0.02)
            model.codec_model.decoder.decoder_seanet.layers[-1].conv.bias.mul_(0.02)
        # Several processes may build at once: write aside, then move into place in one step.
        staging = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=path.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, path)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return path


def build_random(device: str, seed: int = 0):
    """Full-size CSM-1B + Mimi with random weights, built in memory (speed measurements)."""
    import torch
    from transformers import CsmForConditionalGeneration

    from duplex.tts.configs import build_byte_tokenizer, csm_1b_config, token_ids

    tokenizer = build_byte_tokenizer()
    with quiet_transformers():
        config = csm_1b_config(token_ids=token_ids(tokenizer))
        torch.manual_seed(seed)
        with torch.device(device):
            model = CsmForConditionalGeneration(config)
        fill_codebooks(model.codec_model, seed=seed)
    return prepare(model, device), tokenizer
