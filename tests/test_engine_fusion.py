"""The fused-layer machinery that runs on a GPU, checked where it can be on the CPU: who compiles, the
fallback to unfused layers when compiling fails, the unfused layers inside :class:`eager_layers`, and
the compiled layer itself, traced whole by the CPU's Inductor and equal to the plain one."""

from __future__ import annotations

import pytest

from duplex.engine import fusion
from llm_fixtures import tiny_checkpoints  # noqa: F401


def test_only_cuda_compiles():
    """Compiling is asked for by default but happens on CUDA only (the CPU runs the plain layers)."""
    assert fusion.wanted("cuda", True) and fusion.wanted("cuda:1", True)
    assert not fusion.wanted("cpu", True) and not fusion.wanted("cuda", False)


def test_a_failing_compile_falls_back_to_unfused_layers_and_captures_again():
    """When the compiled capture raises, the engine is switched to its unfused layers, told why, and
    captured again; a capture that works is left alone; without compiling nothing is retried."""
    calls: list[str] = []
    lines: list[str] = []
    state = {"compiled": True}

    def capture() -> None:
        calls.append("capture")
        if state["compiled"]:
            raise RuntimeError("triton: out of resources")

    def eager() -> None:
        calls.append("eager")
        state["compiled"] = False

    assert fusion.with_fallback(capture, eager, True, lines.append, "tts") is False
    assert calls == ["capture", "eager", "capture"]
    assert "running them unfused" in lines[0] and "out of resources" in lines[0]

    calls.clear()
    assert fusion.with_fallback(lambda: calls.append("capture"), eager, True, None, "llm") is True
    assert calls == ["capture"]
    state["compiled"] = True
    with pytest.raises(RuntimeError):  # not compiling: a failing capture is the engine's own error
        fusion.with_fallback(capture, eager, False, None, "llm")


def test_eager_layers_swaps_the_plain_layer_in_and_back():
    """Inside ``eager_layers`` a decoder runs its plain layer; after it, whatever it ran before."""
    class Decoder:
        def layer(self) -> str:
            return "plain"

    d = Decoder()
    d.layer_fn = lambda: "fused"  # type: ignore[attr-defined]
    with fusion.eager_layers(d):  # type: ignore[arg-type]
        assert d.layer_fn() == "plain"  # type: ignore[attr-defined]
    assert d.layer_fn() == "fused"  # type: ignore[attr-defined]


@pytest.mark.slow
def test_the_fused_layer_traces_whole_and_agrees_with_the_plain_one(monkeypatch, tiny_checkpoints):
    """The layer a GPU compiles (``torch.compile``, dynamic shapes, whole: no graph break) compiles on
    the CPU's Inductor too, and gives the plain layer's hidden states (to float rounding) for the
    shapes the engines run: decode steps of several batch sizes over the whole window and over
    shorter attention lengths (the TTS's length buckets), and prefills into rows at other starts. A
    change to the layer that breaks its tracing (a graph break, a shape that depends on data) fails
    here, not at a GPU's load. What it cannot show is a GPU's own kernels: the stride failure the
    H200 once hit does not happen on the CPU with or without its fix. (About 50 s, most of it
    Inductor compiling each variant once; it needs a C++ compiler.)"""
    import shutil

    import torch

    from duplex.engine.decoder import LeanDecoder

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (apt-get install g++)")
    model, _ = tiny_checkpoints["qwen2"]
    decoder = LeanDecoder(model.model, model.config, positions=63)
    kv = decoder.new_kv(slots=4)
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)
    decoder.compile()
    g = torch.Generator().manual_seed(0)

    def both(run):
        """``run()``'s output fused, then plain, each from the same K/V."""
        saved = [t.clone() for t in (*kv.keys, *kv.values)]
        fused = run()
        for t, s in zip((*kv.keys, *kv.values), saved):
            t.copy_(s)
        with fusion.eager_layers(decoder):
            plain = run()
        return fused, plain

    cases = []
    with torch.inference_mode():
        for rows, start in ((0, 0), (1, 0), (2, 5)):  # fill some positions of three rows
            x = torch.randn(6, decoder.hidden, generator=g)
            cases.append(both(lambda x=x, rows=rows, start=start: decoder.prefill(x, kv, rows, start)))
        for b, length in ((2, None), (2, 16), (4, 32)):
            x = torch.randn(b, decoder.hidden, generator=g)
            positions = torch.tensor([6, 7, 11, 3][:b])
            rows = torch.arange(b)
            cases.append(both(lambda x=x, p=positions, r=rows, n=length: decoder.decode(x, p, kv, r, n)))
    for fused, plain in cases:
        assert fused.shape == plain.shape
        assert float((fused - plain).abs().max()) <= 1e-4 * float(plain.abs().max()), (fused - plain).abs().max()
