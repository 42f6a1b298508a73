"""The fused-layer machinery that runs on a GPU, checked where it can be on the CPU: who compiles, the
fallback to unfused layers when compiling fails, and the unfused layers inside :class:`eager_layers`."""

from __future__ import annotations

import pytest

from duplex.engine import fusion


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
