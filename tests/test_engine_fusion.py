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


FUSED_LAYER_BUDGET = 12  # the plain layer: 25 (tests/test_engine_kernel_budget.py)


@pytest.mark.slow
def test_the_fused_layer_traces_whole_and_agrees_with_the_plain_one(request, tiny_checkpoints):
    """The layer a GPU compiles (``torch.compile``, dynamic shapes, whole: no graph break) compiles on
    the CPU's Inductor too, and gives the plain layer's hidden states (to float rounding) for the
    shapes the engines run: decode steps of several batch sizes over the whole window and over
    shorter attention lengths (the TTS's length buckets), prefills into rows at other starts, and a
    depth step whose RoPE is in its weights (``LeanDecoder.at_position``). A
    change to the layer that breaks its tracing (a graph break, a shape that depends on data) fails
    here, not at a GPU's load. Each compiled variant launches at most FUSED_LAYER_BUDGET kernels,
    counted in the code Inductor generates (its fused kernels, the matrix products and the attention
    it calls out to: the plain layer's 25 or so become 9-10), and a GPU's Triton code comes from the
    same fusion pass, so a change that splits the layer's fusion fails here too. What it cannot show
    is a GPU's own kernels: the stride failure the H200 once hit does not happen on the CPU with or
    without its fix. (About 50 s, most of it Inductor compiling each variant once; it needs a C++
    compiler.)"""
    import shutil

    import torch

    from torch._inductor.utils import run_and_get_code

    from duplex.engine.decoder import LeanDecoder
    from duplex.engine.opcount import inductor_kernels

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (apt-get install g++)")
    model, _ = tiny_checkpoints["qwen2"]
    decoder = LeanDecoder(model.model, model.config, positions=63)
    kv = decoder.new_kv(slots=4)
    # through the config's own patch: a monkeypatch of it deletes the setting when it is undone, and
    # every later torch.compile in the run (NeMo's modules compile one at import) then fails
    patch = torch._dynamo.config.patch(suppress_errors=False)
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))
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

    def run_cases() -> list:
        cases = []
        for rows, start in ((0, 0), (1, 0), (2, 5)):  # fill some positions of three rows
            x = torch.randn(6, decoder.hidden, generator=g)
            cases.append(both(lambda x=x, rows=rows, start=start: decoder.prefill(x, kv, rows, start)))
        for b, length in ((2, None), (2, 16), (4, 32)):
            x = torch.randn(b, decoder.hidden, generator=g)
            positions = torch.tensor([6, 7, 11, 3][:b])
            rows = torch.arange(b)
            cases.append(both(lambda x=x, p=positions, r=rows, n=length: decoder.decode(x, p, kv, r, n)))
        # a TTS depth step: every row at one position, its rotation in the weights, no mask
        folded, rows = decoder.at_position(12), torch.arange(3)
        x = torch.randn(3, 1, decoder.hidden, generator=g)
        cases.append(both(lambda: decoder.forward(x, torch.full((3, 1), 12), kv, slice(0, 3), rows, 13, None,
                                                  layers=folded)))
        return cases

    torch._dynamo.reset()  # the layer compiled here, its code generated here (no cached graph reused)
    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):
        cases, codes = run_and_get_code(run_cases)
    for fused, plain in cases:
        assert fused.shape == plain.shape
        assert float((fused - plain).abs().max()) <= 1e-4 * float(plain.abs().max()), (fused - plain).abs().max()
    # a variant or two each for prefills, decodes and folded depth steps, shared by the layers
    assert 3 <= len(codes) <= 6, len(codes)
    for code in codes:
        kernels = inductor_kernels(code)
        print(f"fused layer: {len(kernels)} kernels: {', '.join(k[:32] for k in kernels)}")
        assert sum(k.startswith(("extern_kernels.", "torch.ops.")) for k in kernels) >= 5  # it sees the library calls
        assert len(kernels) <= FUSED_LAYER_BUDGET, kernels


def test_the_kernel_count_reads_a_gpus_generated_code_too():
    """``inductor_kernels`` counts a GPU's Triton launches and library calls as it counts the CPU's
    kernels (the form of the code Inductor generates for CUDA), and nothing before ``call``."""
    from duplex.engine.opcount import inductor_kernels

    code = """
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '...')
def call(args):
    with torch.cuda._DeviceGuard(0):
        buf0 = empty_strided_cuda((s0, 64), (64, 1), torch.bfloat16)
        stream0 = get_raw_stream(0)
        triton_red_fused_mean_mul_pow_rsqrt_0.run(arg1_1, buf0, s0, 64, stream=stream0)
        extern_kernels.mm(buf0, arg2_1, out=buf1)
        buf2 = torch.ops.aten._scaled_dot_product_efficient_attention.default(buf1, buf3, buf4, None, False)
        triton_poi_fused_add_0.run(buf2, buf5, stream=stream0)
        del buf0
"""
    assert inductor_kernels(code) == ["triton_red_fused_mean_mul_pow_rsqrt_0", "extern_kernels.mm",
                                      "torch.ops.aten._scaled_dot_product_efficient_attention",
                                      "triton_poi_fused_add_0"]


@pytest.mark.slow
def test_the_compiled_samplers_trace_whole_and_draw_the_eager_tokens(request):
    """The samplers a GPU compiles with the layers (the LLM's ``sample``, the TTS's ``race`` with its
    frame's ``scaled_gumbel`` noise) compile whole on the CPU's Inductor (dynamic shapes, no graph
    break) and draw exactly the tokens the eager functions draw, for two batch sizes: a change that
    breaks their tracing fails here, not at a GPU's load. (Needs a C++ compiler.)"""
    import shutil

    import torch

    from duplex.engine.sampling import draw_key, race, sample, scaled_gumbel, token_keys

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (apt-get install g++)")
    patch = torch._dynamo.config.patch(suppress_errors=False)
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))
    vocab, k = 300, 20
    keys = token_keys(vocab, "cpu")
    compiled_sample, compiled_race = fusion.compile_fn(sample), fusion.compile_fn(race)
    g = torch.Generator().manual_seed(3)
    torch._dynamo.reset()
    with torch.inference_mode():
        for b in (2, 5):
            logits = torch.randn(b, vocab, generator=g) * 3
            temperature = torch.tensor([0.0, 0.8, 1.0, 1.3, 0.5])[:b]
            top_p = torch.tensor([1.0, 0.9, 0.7, 1.0, 0.95])[:b]
            draws = draw_key(torch.arange(b) + 11, torch.arange(b) * 7)
            assert torch.equal(compiled_sample(logits, temperature, top_p, draws, keys, top_k=k),
                               sample(logits, temperature, top_p, draws, keys, top_k=k))
            frame_draws = draw_key(torch.arange(b)[:, None] + 11, torch.arange(4)[None, :])  # [b, K]
            noise = scaled_gumbel(frame_draws, keys, temperature)  # [b, K, V]
            for index in range(4):
                assert torch.equal(compiled_race(logits, noise[:, index], k), race(logits, noise[:, index], k))
