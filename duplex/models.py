"""``duplex models pull|list``: the pretrained checkpoints, fetched once into the Hugging Face cache.

Nothing else in duplex downloads: loaders read local paths or the HF cache only, and a missing model
is a :class:`~duplex.errors.ModelNotFoundError` that points here. ``pull`` shows each model's size
before fetching, with the hub's progress bars; a gated model (CSM-1B asks you to accept its licence)
or no network gets a message saying what to do.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from duplex.config import AgentConfig
from duplex.errors import ModelNotFoundError, UserError


@dataclass(frozen=True)
class Checkpoint:
    role: str
    repo: str  # hub name, or a local path (nothing to fetch)
    files: tuple[str, ...] | None  # None: the whole repository's model files

    @property
    def local(self) -> bool:
        return Path(self.repo).expanduser().exists()


# Files a transformers checkpoint needs (weights, configs, tokenizer); skip other formats.
HF_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*")


def checkpoints(config: AgentConfig) -> list[Checkpoint]:
    """The pretrained checkpoints ``config`` asks for."""
    from duplex.asr.loading import DEFAULT_MODEL, hub_filename
    from duplex.llm.profiles import PRETRAINED as LLM
    from duplex.tts.loading import PRETRAINED_TTS

    asr = config.asr_model or DEFAULT_MODEL
    return [Checkpoint("asr", asr, (hub_filename(asr),)),
            Checkpoint("llm", config.llm_model or LLM, None),
            Checkpoint("tts", config.tts_model or PRETRAINED_TTS, None)]


def _remote_files(ck: Checkpoint) -> list[tuple[str, int]]:
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    info = HfApi().model_info(ck.repo, files_metadata=True)
    out = []
    for s in info.siblings or []:
        wanted = s.rfilename in ck.files if ck.files else any(fnmatch(s.rfilename, p) for p in HF_PATTERNS)
        if wanted:
            out.append((s.rfilename, s.size or 0))
    return out


def _explain(ck: Checkpoint, exc: Exception) -> UserError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return UserError(f"{ck.repo} is gated: accept its licence at https://huggingface.co/{ck.repo} with "
                         "your account, then log in here (`hf auth login` or HF_TOKEN=...) and pull again")
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"{ck.repo} does not exist on the Hugging Face hub (or needs a login); check the "
                         f"--{ck.role}-model name")
    return UserError(f"cannot fetch {ck.repo} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                     "check the network (HF_HUB_OFFLINE must be unset), or copy the checkpoint here and pass "
                     f"its path with --{ck.role}-model")


def pull(config: AgentConfig) -> list[Path]:
    from huggingface_hub import hf_hub_download, snapshot_download

    paths = []
    for ck in checkpoints(config):
        if ck.local:
            print(f"{ck.role}: {ck.repo} is a local path; nothing to fetch")
            paths.append(Path(ck.repo))
            continue
        try:
            files = _remote_files(ck)
            print(f"{ck.role}: {ck.repo}: {len(files)} files, {sum(s for _, s in files) / 1e9:.2f} GB", flush=True)
            if ck.files:
                path = Path(hf_hub_download(ck.repo, ck.files[0]))
            else:
                path = Path(snapshot_download(ck.repo, allow_patterns=list(HF_PATTERNS)))
        except Exception as exc:
            raise _explain(ck, exc) from exc
        print(f"{ck.role}: ready at {path}")
        paths.append(path)
    return paths


def status(config: AgentConfig) -> list[tuple[Checkpoint, str]]:
    """Which checkpoints are available locally (without touching the network)."""
    rows = []
    for ck in checkpoints(config):
        if ck.local:
            rows.append((ck, "local path"))
            continue
        try:
            if ck.files:
                from duplex.asr.loading import resolve

                where = str(resolve(ck.repo))
            else:
                from huggingface_hub import snapshot_download

                where = snapshot_download(ck.repo, local_files_only=True, allow_patterns=list(HF_PATTERNS))
            size = sum(f.stat().st_size for f in Path(where).rglob("*") if f.is_file()) if Path(where).is_dir() \
                else Path(where).stat().st_size
            rows.append((ck, f"cached, {size / 1e9:.2f} GB: {where}"))
        except Exception:  # not cached, or unreadable: either way it must be pulled
            rows.append((ck, "missing: run `duplex models pull`"))
    return rows


def require(config: AgentConfig) -> None:
    """Raise one error naming every pretrained checkpoint that is not available locally."""
    missing = [ck.repo for ck, state in status(config) if state.startswith("missing")]
    if missing:
        raise ModelNotFoundError(f"pretrained model{'s' if len(missing) > 1 else ''} not in the local Hugging "
                                 f"Face cache: {', '.join(missing)}; fetch {'them' if len(missing) > 1 else 'it'} "
                                 "with `duplex models pull` (or pass local paths with --asr-model/--llm-model/"
                                 "--tts-model)")


def main(args: argparse.Namespace) -> int:
    from duplex.cli import config_from_args

    args.profile = "pretrained"
    config = config_from_args(args)
    if args.action == "list":
        for ck, state in status(config):
            print(f"{ck.role:4s} {ck.repo:60s} {state}")
        return 0
    pull(config)
    print("all pretrained models are in the Hugging Face cache; run e.g. `duplex serve`")
    return 0
