"""Loading a causal LM and its tokenizer from a local folder or the local Hugging Face cache.

One loader for every profile: the tiny checkpoints built for tests go through the same
``from_pretrained`` path as real ones. Nothing here downloads; a checkpoint that is not on disk is a
:class:`~duplex.errors.ModelNotFoundError` that says how to fetch it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from duplex.errors import ModelNotFoundError

log = logging.getLogger(__name__)


def model_dtype(device: str) -> Any:
    """bf16 on the GPU, fp32 on the CPU."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def resolve_checkpoint(name_or_path: str) -> Path:
    """The local folder of a checkpoint given as a path or a hub name (from the HF cache only)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (it has no config.json)")
        return path
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"LLM checkpoint not found: {name_or_path} (neither a folder nor a hub name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and friends: not in the cache
        raise ModelNotFoundError(f"the LLM {name_or_path} is not in the local Hugging Face cache; fetch it "
                                 f"with `duplex models pull` (or pass --llm-model /path/to/checkpoint)") from exc


def load_checkpoint(name_or_path: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM, on ``device``, in eval mode, bf16 on GPU / fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_checkpoint(name_or_path)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(device), local_files_only=True,
                                                     attn_implementation="sdpa")
    except OSError as exc:
        raise ModelNotFoundError(f"the LLM checkpoint in {path} is incomplete ({exc}); fetch it again with "
                                 "`duplex models pull`") from exc
    log.info("loaded %s (%s) on %s", name_or_path, type(model).__name__, device)
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to): typed as unbound (device as self)
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]
