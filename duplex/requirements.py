"""What duplex needs from its environment, and one clear error for each thing missing or too old.

- :data:`EXTRAS`: the optional feature sets (pip extras) and the top-level modules that come with
  them, so an import that fails deep inside a stage still names the extra to install;
- :data:`FLOORS`: the oldest version of each package whose API the code calls; the packages that use
  one check it when they are imported (:func:`require`), so an old version is refused at once with
  the version needed, never silently misbehaving.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from types import ModuleType

from duplex.errors import DependencyError

EXTRAS: dict[str, tuple[str, ...]] = {
    "asr": ("nemo", "sentencepiece", "omegaconf", "hydra", "lhotse", "librosa", "lightning", "pytorch_lightning",
            "webdataset", "braceexpand", "kaldialign", "editdistance", "jiwer", "pyannote", "cytoolz"),
    "mic": ("sounddevice", "livekit"),
    "cluster": ("ray",),
    "test": ("pytest", "pytest_asyncio", "selenium"),
}
WHAT_EXTRAS_ENABLE = {
    "asr": "the tiny, random and pretrained profiles (NeMo streaming ASR); without it only --profile fake",
    "mic": "duplex mic (the local microphone and speaker, with WebRTC's echo canceller)",
    "cluster": "duplex serve --replicas N (agents on several GPUs or machines, on Ray Serve)",
    "test": "the test suite (pytest) and its browser test (selenium)",
}
# distribution name -> oldest version the code works with. transformers 5.21: the first whose MimiModel
# has decoder/encoder halves (MimiDecoderModel: upsample, decoder_transformer, decoder_seanet), which
# tts/codec.py streams through; on 5.20.2 and older every TTS test fails with "'MimiDecoder' object
# has no attribute 'decoder_seanet'". .ci/run runs the model tests on this floor too. silero-vad 6.2:
# the first with the v6.2 weights (silero_vad.jit); with 6.0/6.1's a backchannel spoken over the agent
# is not heard as speech (no barge-in) in the session and speculation tests; 6.2.3: the first that
# does not require torchaudio (which pins an exact torch and pulls a CUDA build of it).
FLOORS: dict[str, str] = {
    "torch": "2.4", "transformers": "5.21", "numpy": "1.26", "soundfile": "0.12", "soxr": "0.5",
    "silero-vad": "6.2.3", "aiohttp": "3.9", "aiortc": "1.9", "nemo_toolkit": "2.4", "sounddevice": "0.4",
    "livekit": "1.0.1",  # 1.0.0: AudioProcessingModule lacks set_stream_delay_ms
    "ray": "2.56.1",  # 2.56.0 and older: Serve reads FieldDescriptor.label, which protobuf 7 removed
}
INSTALL = {"torch": "pip install torch==2.13.0 (the CPU build here; a GPU machine brings its own CUDA build)"}


def installed(package: str) -> str | None:
    """The installed version of distribution ``package``, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the leading numeric release parts."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def too_old(package: str, version: str | None = None) -> str | None:
    """A message if ``package`` (at ``version``, default: the installed one) is below its floor."""
    floor = FLOORS.get(package)
    version = version if version is not None else installed(package)
    if floor is None or version is None or version_tuple(version) >= version_tuple(floor):
        return None
    fix = INSTALL.get(package, f"pip install -U '{package}>={floor}'")
    return f"{package} {version} is installed, but duplex needs {package} >= {floor}: {fix}"


def require(*packages: str) -> None:
    """Refuse to go on when one of ``packages`` is missing or older than duplex needs."""
    for package in packages:
        if installed(package) is None:
            extra = next((e for e, mods in EXTRAS.items() if package.replace("-", "_").split("_")[0] in mods), None)
            how = f"pip install -e '.[{extra}]'" if extra else INSTALL.get(package, "pip install -e .")
            raise DependencyError(f"duplex needs {package}, which is not installed: {how}")
        problem = too_old(package)
        if problem:
            raise DependencyError(problem)


def extra_of(module: str) -> str | None:
    """The pip extra that brings top-level module ``module``, if any."""
    top = module.split(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)


def missing_module(exc: ModuleNotFoundError, what: str = "this command") -> DependencyError:
    """The error for an import that failed: the extra to install, or the package."""
    name = (exc.name or str(exc)).split(".")[0]
    extra = extra_of(name)
    if extra:
        return DependencyError(f"{what} needs duplex's '{extra}' extra ({name} is not installed): "
                               f"pip install -e '.[{extra}]' (it enables {WHAT_EXTRAS_ENABLE[extra]})")
    return DependencyError(f"{what} needs the Python package {name!r}, which is not installed: pip install -e . "
                           "installs duplex's dependencies")


def import_extra(module: str, what: str) -> ModuleType:
    """Import ``module`` (of an optional extra) for ``what``: a missing package is an error naming
    the extra to install, one older than its floor is refused."""
    top = module.split(".")[0]
    try:
        importlib.import_module(top)  # first: a submodule imported before is found without its package
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise missing_module(exc, what) from exc
    require(top)
    return imported
