"""Loading ASR models: the profiles, and clear errors for missing, wrong or non-streaming checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asr_fixtures import tiny_nemo  # noqa: F401 (fixture)
from duplex.config import AgentConfig
from duplex.errors import ConfigError, ModelNotFoundError


@pytest.fixture(scope="module")
def offline_checkpoint(tmp_path_factory):
    """A tiny FastConformer trained-for-offline layout (full attention, non-causal), saved as .nemo."""
    from omegaconf import OmegaConf

    from duplex.asr import architectures as arch
    from duplex.asr.synthetic import TINY_VERSION
    from duplex.asr.tokenizer import build_sentencepiece
    from duplex.config import cache_dir

    tokenizer = build_sentencepiece(cache_dir() / "asr" / f"tiny-v{TINY_VERSION}" / "tokenizer", 64)
    cfg = arch.fastconformer_config(arch.TINY, "ctc", str(tokenizer))
    cfg["encoder"].update(att_context_size=[-1, -1], att_context_style="regular", causal_downsampling=False,
                          conv_context_size=None)
    model = arch.model_class("ctc")(cfg=OmegaConf.create(cfg))
    path = tmp_path_factory.mktemp("offline") / "offline.nemo"
    model.save_to(str(path))
    return path


def test_tiny_profile_round_trip(tiny_nemo):
    """The tiny profile builds (or reuses) its cached .nemo and loads it through load_nemo into a
    streaming model at the configured latency; the EOU variant is picked with --asr-model tiny-eou."""
    from duplex.asr.profiles import build_asr
    from duplex.asr.streaming import StreamingASR

    asr = build_asr(AgentConfig(profile="tiny", asr_latency="[70,1]"), "cpu")
    assert isinstance(asr, StreamingASR) and asr.context == (70, 1) and asr.head == "rnnt"
    assert abs(asr.chunk_seconds - 0.16) < 1e-9
    asr.close()
    eou = build_asr(AgentConfig(profile="tiny", asr_model="tiny-eou"), "cpu")
    assert eou.vocab.end_ids and eou.context == (70, 6)
    eou.close()


def test_missing_and_wrong_files(tmp_path):
    """A missing .nemo path, a hub name not in the local cache, a directory and a file that is not a
    checkpoint each raise an error naming the problem (and `duplex models pull` for the hub)."""
    from duplex.asr.loading import load_nemo

    with pytest.raises(ModelNotFoundError, match="not found: /no/such/model.nemo"):
        load_nemo("/no/such/model.nemo")
    with pytest.raises(ModelNotFoundError, match="duplex models pull"):
        load_nemo("nvidia/surely_not_cached_streaming_model")
    with pytest.raises(ModelNotFoundError, match="directory"):
        load_nemo(str(tmp_path))
    junk = tmp_path / "junk.nemo"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load .*junk.nemo as a NeMo ASR checkpoint"):
        load_nemo(str(junk))
    with pytest.raises(ModelNotFoundError, match="duplex models pull"):
        from duplex.asr.profiles import build_asr

        build_asr(AgentConfig(profile="pretrained", asr_model="nvidia/parakeet_not_here"), "cpu")


def test_offline_model_is_refused(offline_checkpoint):
    """A FastConformer trained for offline use (full attention, non-causal subsampling and convolutions)
    loads, but the streaming stage refuses it, saying why."""
    from duplex.asr.loading import load_nemo
    from duplex.asr.streaming import StreamingASR

    model = load_nemo(str(offline_checkpoint))
    with pytest.raises(ConfigError, match="not cache-aware.*chunked_limited.*non-causal"):
        StreamingASR(model, context=(70, 1))


def test_latency_settings(tiny_nemo):
    """Latency strings parse ('[70,6]', '70,6'); malformed ones and contexts the model was not trained
    for are refused with the supported list; a model trained for other contexts runs at its own when
    the latency was left at the default, but not when it was asked for explicitly."""
    from duplex.asr.encoder import parse_context, select_context
    from duplex.asr.profiles import resolve_context

    assert parse_context("[70,6]") == (70, 6) and parse_context(" 70, 13 ") == (70, 13)
    for bad in ("[70]", "[a,b]", "[70,-1]", ""):
        with pytest.raises(ConfigError, match="attention context"):
            parse_context(bad)
    with pytest.raises(ConfigError, match=r"trained for the attention contexts \[70,13\], \[70,6\]"):
        select_context(tiny_nemo, (70, 5))
    encoder = tiny_nemo.encoder
    saved = encoder.att_context_size_all, encoder.att_context_size
    try:
        encoder.att_context_size_all, encoder.att_context_size = [[70, 1]], [70, 1]
        assert resolve_context(AgentConfig(), tiny_nemo) == (70, 1)
        assert resolve_context(AgentConfig(asr_latency="[70,13]"), tiny_nemo) == (70, 13)  # refused later
    finally:
        encoder.att_context_size_all, encoder.att_context_size = saved
        encoder.setup_streaming_params()


def test_cli_modules_import_lightly():
    """The modules the CLI imports (transcribe, bench, profiles) load neither torch nor NeMo, so
    `duplex --help` stays instant."""
    code = ("import sys, duplex.asr.cli, duplex.asr.bench, duplex.asr.profiles; "
            "print(sorted(m for m in ('torch', 'nemo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
