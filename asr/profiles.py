"""``build_asr``: the streaming ASR model of each profile (tiny, random, pretrained).

- ``tiny``: a tiny cache-aware FastConformer built once and cached (``--asr-model tiny-eou`` picks
  the variant with end-of-utterance tokens; a ``.nemo`` path is loaded as is);
- ``random``: the full-size FastConformer large hybrid streaming architecture, random weights;
- ``pretrained``: ``--asr-model`` (a ``.nemo`` file or a hub name in the local cache), by default
  nvidia/stt_en_fastconformer_hybrid_large_streaming_multi.

``config.asr_latency`` picks the attention context. A model trained for other contexts only (such as
the parakeet EOU model, [70,1]) runs at its own default when the latency was left at the default.
"""

from __future__ import annotations

import logging

from duplex.config import AgentConfig
from duplex.errors import ConfigError

log = logging.getLogger(__name__)


def load_model(config: AgentConfig, device: str):
    """The NeMo model the config names (blocking; imports NeMo)."""
    from duplex.asr import loading, synthetic

    name = config.asr_model
    if config.profile == "tiny":
        if name and name not in synthetic.TINY_VARIANTS:
            return loading.load_nemo(name, device)
        return loading.load_nemo(str(synthetic.tiny_model_path(name or "tiny")), device)
    if config.profile == "random":
        if name not in (None, "fastconformer-large"):
            raise ConfigError(f"the random profile builds the FastConformer large architecture; got "
                              f"--asr-model {name!r} (use fastconformer-large or leave it out)")
        return synthetic.build_random_large(device)
    if config.profile == "pretrained":
        return loading.load_nemo(name or loading.DEFAULT_MODEL, device)
    raise ConfigError(f"no ASR model for profile {config.profile!r}")


def resolve_context(config: AgentConfig, model) -> tuple[int, int]:
    """The attention context to run: ``config.asr_latency``, or the model's own when left default."""
    from duplex.asr.encoder import parse_context

    context = parse_context(config.asr_latency)
    supported = [tuple(int(v) for v in c) for c in model.encoder.att_context_size_all]
    if context not in supported and config.asr_latency == AgentConfig.asr_latency:
        fallback = tuple(int(v) for v in model.encoder.att_context_size)
        log.warning("ASR model is not trained for the default latency %s; using its own [%d,%d]",
                    config.asr_latency, *fallback)
        return fallback  # type: ignore[return-value]
    return context


def build_asr(config: AgentConfig, device: str, *, max_batch: int = 32):
    """The :class:`~duplex.asr.streaming.StreamingASR` for ``config`` on ``device`` (blocking)."""
    from duplex.asr.streaming import StreamingASR
    from duplex.requirements import require

    require("nemo_toolkit")

    model = load_model(config, device)
    return StreamingASR(model, context=resolve_context(config, model), device=device, max_batch=max_batch,
                        graphs=config.graphs)
