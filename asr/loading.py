"""Loading NeMo ASR checkpoints: a ``.nemo`` file, or a hub name found in the local Hugging Face cache.

Nothing here downloads: a hub name that is not cached raises :class:`~duplex.errors.ModelNotFoundError`
naming the model and ``duplex models pull`` (:func:`download` is what that command calls). Every
model, real or tiny, goes through :func:`load_nemo`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from duplex.errors import ConfigError, ModelNotFoundError

DEFAULT_MODEL = "nvidia/stt_en_fastconformer_hybrid_large_streaming_multi"
EOU_MODEL = "nvidia/parakeet_realtime_eou_120m-v1"
KNOWN_MODELS = (DEFAULT_MODEL, EOU_MODEL)

_NOISY_LOGGERS = ("nv_one_logger", "nemo_logger", "pytorch_lightning", "lightning", "lightning.pytorch",
                  "lightning_fabric", "numexpr")


def quiet_nemo() -> None:
    """Silence NeMo's (and its dependencies') informational logging; call before importing NeMo."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(logging.ERROR)


def hub_filename(name: str) -> str:
    """The .nemo file a NeMo model repository on the hub holds (``org/name`` -> ``name.nemo``)."""
    return name.rstrip("/").split("/")[-1] + ".nemo"


def resolve(name_or_path: str) -> Path:
    """The local ``.nemo`` file for a path or a hub name (``org/model``), or a clear error."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_file():
            raise ModelNotFoundError(f"ASR checkpoint {path} is a directory; pass the .nemo file")
        return path
    looks_like_path = name_or_path.endswith(".nemo") or name_or_path.startswith(("/", ".", "~"))
    if looks_like_path or name_or_path.count("/") != 1:
        raise ModelNotFoundError(f"ASR checkpoint not found: {name_or_path} (expected a .nemo file or a hub "
                                 "name such as nvidia/stt_en_fastconformer_hybrid_large_streaming_multi)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id=name_or_path, filename=hub_filename(name_or_path))
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    raise ModelNotFoundError(f"ASR model {name_or_path} is not in the local Hugging Face cache; fetch it "
                             f"with `duplex models pull` (or pass a .nemo file with --asr-model)")


def download(name: str) -> Path:
    """Fetch a hub model's ``.nemo`` file into the Hugging Face cache (for ``duplex models pull``)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=name, filename=hub_filename(name)))


def load_nemo(name_or_path: str, device: str = "cpu"):
    """Restore a NeMo ASR model (eval mode, on ``device``) from a ``.nemo`` file or the hub cache."""
    path = resolve(name_or_path)
    quiet_nemo()
    import torch
    from nemo.collections.asr.models import ASRModel

    try:
        model = ASRModel.restore_from(str(path), map_location=torch.device(device))
    except Exception as exc:  # tarfile / omegaconf / hydra errors for files that are not checkpoints
        raise ConfigError(f"cannot load {path} as a NeMo ASR checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, ASRModel):
        raise ConfigError(f"{path} holds a {type(model).__name__}, not an ASR model")
    return model.eval()
