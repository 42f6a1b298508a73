"""Agent configuration: one dataclass, validated once, with clear errors for bad values."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from duplex.errors import ConfigError

Profile = Literal["pretrained", "tiny", "random", "fake"]
PROFILES: tuple[str, ...] = ("pretrained", "tiny", "random", "fake")
ENGINE_CORES: tuple[str, ...] = ("thread", "process")  # where the engines run (AgentConfig.engine_core)

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant in a spoken conversation. Answer briefly, in one to three short "
    "sentences of plain spoken English. Never use lists, markdown, emoji or symbols that cannot be "
    "read aloud. If the user interrupts you, stop and listen."
)


@dataclass
class TurnConfig:
    """Turn-taking and barge-in timing (seconds)."""

    # Silence after speech before the turn ends when the message is surely complete (the ASR's
    # end-of-utterance token, or an LLM estimate at confident_eot) ...
    confident_silence_s: float = 0.2
    # ... when the LLM says it is complete ...
    min_silence_s: float = 0.4
    # ... and when nothing does (the user may just be pausing).
    max_silence_s: float = 1.5
    # The LLM's end-of-turn probability at or above which the message counts as complete ...
    eot_threshold: float = 0.5
    # ... and as surely complete.
    confident_eot: float = 0.9
    # Start the reply as soon as the user's speech stops, its audio held back until the turn ends
    # (withdrawn without a trace if the user goes on).
    speculate: bool = True
    # ... starting once the user's voice has been quiet this long inside speech (the VAD's windows
    # are 32 ms, so 0.032 is its first silent window; its end of speech comes 160 ms in): earlier
    # hides more of the reply's compute, and withdraws more guesses at pauses between words.
    speculate_after_s: float = 0.032
    # A barge-in with no recognised words this long after the user's speech stopped is a false alarm
    # (cough, noise): the agent resumes where it paused.
    false_interruption_s: float = 0.6
    # The agent pauses at the first voiced VAD window under its voice; a voice that ends before it is
    # speech resumes it after this much quiet (a dip inside the first syllable does not).
    onset_hold_s: float = 0.25
    # The longest the agent stays paused under the user's speech before the policy decides without
    # a verdict (yield if there are words, resume if there are none).
    max_pause_s: float = 3.0
    # Whether to ask the LLM if words said over the agent are a backchannel to talk over ...
    backchannels: bool = True
    # ... and how long its answer may take: a check still unanswered then is an error, and the agent
    # yields (the user is not left talking into a paused agent for max_pause_s).
    check_timeout_s: float = 0.5

    def validate(self) -> None:
        for name in ("confident_silence_s", "min_silence_s", "max_silence_s", "false_interruption_s", "onset_hold_s",
                     "speculate_after_s",
                     "max_pause_s",
                     "check_timeout_s"):
            value = getattr(self, name)
            if not (0.0 <= value <= 10.0):
                raise ConfigError(f"turn.{name} must be between 0 and 10 seconds, got {value}")
        if self.min_silence_s > self.max_silence_s:
            raise ConfigError(f"turn.min_silence_s ({self.min_silence_s}) must not exceed "
                              f"turn.max_silence_s ({self.max_silence_s})")
        if not (0.0 < self.eot_threshold <= 1.0):
            raise ConfigError(f"turn.eot_threshold must be in (0, 1], got {self.eot_threshold}")
        if not (self.eot_threshold <= self.confident_eot <= 1.0):
            raise ConfigError(f"turn.confident_eot must be in [eot_threshold, 1], got {self.confident_eot}")
        if self.confident_silence_s > self.min_silence_s:
            raise ConfigError(f"turn.confident_silence_s ({self.confident_silence_s}) must not exceed "
                              f"turn.min_silence_s ({self.min_silence_s})")


@dataclass
class AgentConfig:
    """Everything an :class:`~duplex.agent.Agent` needs to load its models and run sessions.

    ``asr_model``, ``llm_model`` and ``tts_model`` override the profile's checkpoint (a local path or a
    Hugging Face hub name) for the ``pretrained`` profile, or the architecture name for ``random``.
    """

    profile: Profile = "pretrained"
    device: str | None = None  # None: cuda if available, else cpu
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    asr_model: str | None = None
    asr_latency: str = "[70,6]"  # cache-aware attention context [left, right]; see duplex.asr
    llm_model: str | None = None
    llm_window: int = 2048  # attention-sink cache size in tokens (sink + rolling window)
    # Longest reply in tokens; None: 160 for pretrained models, 32 for random weights (which babble
    # until the limit: the tiny profile stays quick).
    max_reply_tokens: int | None = None
    temperature: float = 0.7
    tts_model: str | None = None
    tts_chunk_frames: int = 2  # codec frames per decode call
    voice: str | None = None  # path of a short reference clip that sets the agent's voice
    voice_text: str | None = None  # its transcript
    seed: int = 0
    # Sessions the LLM and TTS engines hold at once (rows of their K/V pools, the largest batched
    # step); None: 32 on a GPU, 4 on the CPU.
    engine_slots: int | None = None
    # Capture the engines' batched steps in CUDA graphs at load (GPU only; --no-graphs to compare).
    graphs: bool = True
    # Fuse each decoder layer's kernels with torch.compile at load (CUDA only; experimental: the first
    # load on a machine takes minutes, later ones reuse the cache; --compile turns it on).
    compile: bool = False
    # Where the engines run: "thread" (in this process, on worker threads) or "process" (a child
    # process that owns the device; sessions, WebRTC and HTTP stay here, off the engines' GIL).
    engine_core: str = "thread"
    # Benchmarks: replies always run to max_reply_tokens, so figures do not depend on when random
    # weights happen to stop.
    fixed_lengths: bool = False
    # A tool call that takes longer than this gets one holding phrase spoken while it runs.
    tool_hold_s: float = 1.0
    tool_hold_phrase: str = "One moment."
    tools: list[str] = field(default_factory=list)  # module:attribute specs of tools to load (--tools)
    turn: TurnConfig = field(default_factory=TurnConfig)
    fake: dict[str, object] = field(default_factory=dict)  # options of the fake stages (profile "fake")

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def slots(self) -> int:
        """``engine_slots``, or the default for the device."""
        if self.engine_slots is not None:
            return self.engine_slots
        return 32 if self.resolved_device().startswith("cuda") else 4

    def validate(self) -> AgentConfig:
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device is not None and self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} asked for, but no CUDA GPU is available; "
                                  "use --device cpu")
        if self.llm_window < 64:
            raise ConfigError(f"llm_window must be at least 64 tokens, got {self.llm_window}")
        if self.max_reply_tokens is None:
            self.max_reply_tokens = 160 if self.profile == "pretrained" else 32
        if not (1 <= self.max_reply_tokens <= 4096):
            raise ConfigError(f"max_reply_tokens must be in 1..4096, got {self.max_reply_tokens}")
        if not (0.0 <= self.temperature <= 2.0):
            raise ConfigError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.engine_slots is not None and not (1 <= self.engine_slots <= 256):
            raise ConfigError(f"engine_slots must be in 1..256, got {self.engine_slots}")
        if self.engine_core not in ENGINE_CORES:
            raise ConfigError(f"engine_core must be one of {', '.join(ENGINE_CORES)}, got {self.engine_core!r}")
        if not (1 <= self.tts_chunk_frames <= 50):
            raise ConfigError(f"tts_chunk_frames must be in 1..50, got {self.tts_chunk_frames}")
        if (self.voice is None) != (self.voice_text is None):
            raise ConfigError("a voice prompt needs both the clip (voice) and its transcript (voice_text)")
        if self.voice is not None and not Path(self.voice).is_file():
            raise ConfigError(f"voice clip not found: {self.voice}")
        if self.tools is None:
            self.tools = []
        if not isinstance(self.tools, list) or not all(isinstance(t, str) for t in self.tools):
            raise ConfigError(f"tools must be a list of 'module:attribute' strings, got {self.tools!r}")
        if not (0.0 < self.tool_hold_s <= 60.0):
            raise ConfigError(f"tool_hold_s must be in (0, 60] seconds, got {self.tool_hold_s}")
        self.turn.validate()
        return self


def cache_dir() -> Path:
    """Where duplex keeps what it builds (tiny models): $DUPLEX_CACHE, else ~/.cache/duplex."""
    root = os.environ.get("DUPLEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "duplex")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- configuration files ------------------------------------------------------------------------------

_TYPES = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,), "Profile": (str,),
          "dict": (dict,), "TurnConfig": (dict,)}


def _expected(annotation: str) -> tuple[tuple[type, ...], bool]:
    """The Python types a TOML value may have for a field annotated ``annotation``, and whether it
    may be left unset (TOML has no null: an optional field is simply omitted)."""
    parts = [p.strip() for p in annotation.split("|")]
    types: tuple[type, ...] = ()
    for part in parts:
        types += _TYPES.get(part.split("[")[0], ())
    return types, "None" in parts


def _assign(target: object, values: dict, where: str) -> None:
    from dataclasses import fields

    known = {f.name: f for f in fields(target)}  # type: ignore[arg-type]
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; the keys are: {', '.join(sorted(known))}")
        types, _ = _expected(str(known[key].type))
        if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            names = " or ".join(sorted({t.__name__ for t in types}))
            raise ConfigError(f"{where}: {key} must be {names}, got {value!r}")
        if key == "turn":
            _assign(target.turn, value, f"{where} [turn]")  # type: ignore[attr-defined]
        else:
            is_float = str(known[key].type).split("|")[0].strip() == "float"
            setattr(target, key, float(value) if is_float and value is not None else value)


def config_from_dict(values: dict, where: str = "config") -> AgentConfig:
    """An :class:`AgentConfig` from a mapping of its fields (``turn`` a mapping of
    :class:`TurnConfig` fields), checked (a copy is validated, so defaults that depend on the
    profile stay open for options given later); errors name the bad key and where it came from."""
    import copy

    config = AgentConfig()
    _assign(config, dict(values), where)
    try:
        copy.deepcopy(config).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return config


def load_config(path: str | os.PathLike) -> AgentConfig:
    """An :class:`AgentConfig` from a TOML file: top-level keys are its fields, ``[turn]`` holds the
    turn-taking timings, ``[fake.asr]``, ``[fake.llm]``, ``[fake.tts]`` the fake stages' options. For example::

        profile = "tiny"
        engine_slots = 8
        [turn]
        min_silence_s = 0.3
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        values = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
    return config_from_dict(values, str(file))
