"""Kernel budgets of the captured steps, held on the CPU: a step that grows shows here before any GPU.

A captured step is one graph replay, but the GPU runs its kernels one after the other, a few
microseconds each however small, so the number of kernels per step is what a fused step keeps down.
:func:`duplex.engine.opcount.count_ops` counts the aten ops of one eager step that launch a kernel
(views and allocations left out), through a real engine built on the tiny checkpoints. Each budget
is split into a cost per layer (measured as the difference between the model and the same model
with one layer fewer) and a fixed cost (embedding, masks, final norm, output layer, sampling), so
it holds for the full-size models too. On a GPU the steps are compiled (:mod:`duplex.engine.fusion`)
and launch fewer kernels still; these are the eager counts, which the CPU and ``--no-compile`` run.
"""

from __future__ import annotations

import pytest

from llm_fixtures import make_llm, tiny_checkpoints, single_torch_thread  # noqa: F401
from tts_fixtures import make_engine, one_torch_thread, tiny_tts_checkpoint  # noqa: F401
from asr_fixtures import tiny_nemo  # noqa: F401

# fp32 on the CPU: two RMSNorms of 6 (one fused kernel each on CUDA), qkv, RoPE of 3 (written back
# into the product), the new keys and values written in one, attention, 4 GEMMs, silu, mul
LAYER_BUDGET = 23
# a TTS depth layer after the first depth step: every row at one position, whose RoPE rotation is in
# the layer's qkv weights (LeanDecoder.at_position), so its three RoPE kernels never run
FOLDED_LAYER_BUDGET = LAYER_BUDGET - 3
# the LLM decode step gathers each entry's K/V row by index (its batch is the replying sessions,
# wherever their rows are; keys and values in one), a kernel per layer the TTS frame step (rows 0..b-1,
# a view) does not run
LLM_LAYER_BUDGET = LAYER_BUDGET + 1
LLM_FIXED_BUDGET = 60  # embedding, RoPE tables, mask, final norm, output layer, top-k sampling with its noise (50)
TTS_CODEBOOK_BUDGET = 13  # per codebook: its head, its draw (race: 5), the next input, the depth step's final norm (6)
TTS_FIXED_BUDGET = 60  # the backbone's own glue, the frame's noise for every codebook, the next input (153 in all at K=8)
# the frame step ends by decoding its frame (Mimi, duplex.tts.slot_codec): per convolution the kept
# left context joined, the convolution, the new context committed (kept as a view until then), its
# activation or residual
CODEC_CONV_BUDGET = 6
# per Mimi transformer layer (duplex.tts.codec.transformer_step, 12 now; Mimi's own forward 29): two
# LayerNorms, qkv, RoPE of 3, the new keys and values written into the ring, attention, three products, gelu
CODEC_LAYER_BUDGET = 13
# the ASR's steady step (NeMo's FastConformer weights folded by duplex.asr.conformer_layer, run by
# duplex.asr.kv_encoder; 28, 17 and 27 now: NeMo's own layer is 46, and its masked subsampling made the rest 103)
# per conformer layer: two feed-forwards of 5, attention of 8 (norm, [q+u, q+v, k, v] in one product, the
# window's K/V joined, the position term, its mask added, SDPA, out product, residual), the conv module of
# 9 (norm, pointwise, GLU, cache joined, depth-wise, its LayerNorm, swish, pointwise, residual), the out norm
ASR_LAYER_BUDGET = 30
ASR_LABEL_STEP_BUDGET = 24  # per label step of the RNNT decoding (label-looping): prediction net, joint, argmax,
# state kept, the row's frame gathered and moved on, its frame's label count (23)
ASR_FIXED_BUDGET = 40  # the subsampling's convolutions, the mask gathered, the caches' gathers and commits'
# stacks, the encoder output kept for the decoding again, the labels and frames packed (37)
# the codes' lookup (one for every codebook: duplex.tts.codec.code_table), the ring's mask, RoPE tables, the clamp
CODEC_FIXED_BUDGET = 30


def _with_layers(decoder, n: int, folded: dict | None = None):
    """A context in which ``decoder`` runs only its first ``n`` layers (and so do the folded layer
    lists in ``folded``, position -> layers, where a step runs those instead)."""
    folded = {} if folded is None else folded

    class _Layers:
        def __enter__(self):
            self.saved = decoder.layers, dict(folded)
            decoder.layers = decoder.layers[:n]
            folded.update({p: layers[:n] for p, layers in folded.items()})

        def __exit__(self, *exc):
            decoder.layers = self.saved[0]
            folded.update(self.saved[1])

    return _Layers()


def test_the_llm_decode_step_stays_within_its_kernel_budget(make_llm):
    """One decode step of the LLM costs at most LLM_LAYER_BUDGET kernels per layer and LLM_FIXED_BUDGET
    more, at batch 1 and 4 (the count does not grow with the batch)."""
    llm = make_llm("qwen2", window=128)
    engine = llm.engine
    layers = len(engine.decoder.layers)
    assert layers >= 2
    full = {b: engine.ops_per_step(b) for b in (1, 4)}
    with _with_layers(engine.decoder, layers - 1):
        fewer = engine.ops_per_step(1)
    per_layer, fixed = full[1] - fewer, full[1] - layers * (full[1] - fewer)
    print(f"llm decode: {full[1]} ops ({layers} layers): {per_layer} per layer + {fixed}")
    assert full[4] == full[1]
    assert 10 <= per_layer <= LLM_LAYER_BUDGET, per_layer  # >= 10: the count sees the layers at all
    assert fixed <= LLM_FIXED_BUDGET, fixed


def test_the_tts_frame_step_stays_within_its_kernel_budget(make_engine):
    """One frame step of CSM (backbone, first codebook, every depth step unrolled, every codebook
    drawn) costs at most LAYER_BUDGET kernels per backbone layer and per depth layer of the first
    depth step, FOLDED_LAYER_BUDGET per depth layer of the K - 2 later ones (their RoPE in their
    weights), TTS_CODEBOOK_BUDGET per codebook and TTS_FIXED_BUDGET more."""
    engine = make_engine()
    k, backbone, depth = engine.num_codebooks, len(engine.backbone.layers), len(engine.depth.layers)
    full = engine.ops_per_step(1)
    with _with_layers(engine.backbone, backbone - 1):
        per_backbone_layer = full - engine.ops_per_step(1)
    with _with_layers(engine.depth, depth - 1, engine._depth_at):
        per_depth_layer = (full - engine.ops_per_step(1)) / (k - 1)
    codec = _codec_ops(engine)
    rest = full - backbone * per_backbone_layer - (k - 1) * depth * per_depth_layer - codec
    print(f"tts frame: {full} ops ({k} codebooks, {backbone}+{depth} layers): {per_backbone_layer} per backbone "
          f"layer, {per_depth_layer:.2f} per depth layer pass, {codec} for the codec, {rest:.0f} for codebooks "
          "and glue")
    assert 10 <= per_backbone_layer <= LAYER_BUDGET
    # the same layer, its first depth step over two positions (two more copies for its queries) and
    # rotating them; the K - 2 others without RoPE
    assert 10 <= per_depth_layer <= (LAYER_BUDGET + 2 + (k - 2) * FOLDED_LAYER_BUDGET) / (k - 1), per_depth_layer
    assert rest <= k * TTS_CODEBOOK_BUDGET + TTS_FIXED_BUDGET, rest
    assert engine.ops_per_step(4) == full


def _codec_ops(engine) -> int:
    """Kernels of the frame step's codec decode (one row), held to its budget per convolution and per
    transformer layer."""
    import torch

    from duplex.engine.opcount import count_ops

    codec = engine.codec
    k = engine.num_codebooks

    def ops() -> int:
        codes, commit = torch.zeros(1, k, dtype=torch.long), torch.zeros(1, dtype=torch.bool)
        return sum(count_ops(lambda: codec.step(codes, commit)).values())

    full = ops()
    transformer = codec.streaming.decoder.decoder_transformer
    layers = len(transformer.layers)
    with _with_layers(transformer, layers - 1):
        per_layer = full - ops()
    convs = len(codec.context) + len(codec.overlap)
    rest = full - layers * per_layer
    print(f"codec: {full} ops: {per_layer} per transformer layer, {rest} for {convs} convolutions and the rest")
    assert 8 <= per_layer <= CODEC_LAYER_BUDGET, per_layer
    assert rest <= convs * CODEC_CONV_BUDGET + CODEC_FIXED_BUDGET, rest  # nothing per codebook
    return full


@pytest.mark.parametrize("greedy", [True, False])
def test_greedy_frames_make_no_noise(make_engine, greedy):
    """A greedy TTS engine (temperature 0) hashes no noise at all: its frame step has no bit mixing."""
    from duplex.engine.opcount import count_ops
    from duplex.tts.engine import Sampling

    engine = make_engine(sampling=Sampling(temperature=0.0) if greedy else Sampling())
    engine._prepare(1)
    ops = count_ops(lambda: engine._frame_fn(1, engine.graphs.lengths[0]))
    assert (ops["bitwise_xor"] == 0) == greedy


def test_the_asr_steady_step_stays_within_its_kernel_budget(tiny_nemo):
    """One steady ASR step (subsampling, every conformer layer, the RNNT decoding with all its label
    steps, as a GPU captures it) costs at most ASR_LAYER_BUDGET kernels per conformer layer,
    ASR_LABEL_STEP_BUDGET per label step (StreamingASR.label_steps) and ASR_FIXED_BUDGET more, the
    same at batch 1 and 4; counting leaves the captured buckets' outputs where their replays write."""
    import asyncio

    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(tiny_nemo, context=(70, 0), max_batch=4)
    try:
        asr.graphs.rehearse = True  # each bucket's capture call made as a GPU makes it at load
        asyncio.run(asr.warm_up())
        captured = dict(asr._encoded)  # what a GPU's replays would refill
        encoder = tiny_nemo.encoder
        layers = len(encoder.layers)
        assert layers >= 2
        full = asr.ops_per_step(1)
        saved = asr.layers.weights  # the folded layers the step runs (duplex.asr.conformer_layer)
        asr.layers.weights = saved[:layers - 1]
        try:
            per_layer = full - asr.ops_per_step(1)
        finally:
            asr.layers.weights = saved
        label_steps, symbols = asr.label_steps, asr.decoder.max_symbols
        assert label_steps >= 3
        # one label step fewer, each with its frame's label count (kept where the steps can reach
        # max_symbols on one frame, as at full size with longer chunks)
        asr.label_steps, asr.decoder.max_symbols = label_steps - 1, min(symbols, label_steps - 1)
        try:
            per_label_step = full - asr.ops_per_step(1)
        finally:
            asr.label_steps, asr.decoder.max_symbols = label_steps, symbols
        fixed = full - layers * per_layer - label_steps * per_label_step
        print(f"asr steady step: {full} ops ({layers} layers, {label_steps} label steps): {per_layer} per layer, "
              f"{per_label_step:.0f} per label step, {fixed:.0f} for subsampling and the rest")
        assert 20 <= per_layer <= ASR_LAYER_BUDGET, per_layer
        assert 1 <= per_label_step <= ASR_LABEL_STEP_BUDGET, per_label_step
        assert fixed <= ASR_FIXED_BUDGET, fixed
        assert full <= asr.ops_per_step(4) <= full + 8  # a batch adds a few layout copies, not kernels per row
        # counting ran the step eagerly: the captured buckets' outputs are still the ones replays refill
        assert captured and all(asr._encoded[b] is step for b, step in captured.items())
    finally:
        asr.close()


def test_the_asr_captured_flush_stays_within_its_kernel_budget(tiny_nemo):
    """An endpoint's flush as a GPU captures it (the frames after the last chunk through every conformer
    layer, then the label-looping decoding) costs, for every number of frames, at most the steady
    step's budgets: ASR_LAYER_BUDGET per layer, ASR_LABEL_STEP_BUDGET per label step and
    ASR_FIXED_BUDGET more, in one replay where the eager flush launched each kernel and waited for the
    device at every label step; counting leaves the captured outputs where their replays write."""
    import asyncio

    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(tiny_nemo, context=(70, 6), max_batch=2)
    try:
        asr.graphs.rehearse = True
        asyncio.run(asr.warm_up())
        captured = dict(asr._flushed)
        layers = len(tiny_nemo.encoder.layers)
        counts = {frames: asr.ops_per_flush(frames) for frames in asr.flushes.lengths}
        print("asr captured flush, ops by encoder frames:", counts)
        assert len(counts) == 2 * asr.plan.out + 1
        for frames, ops in counts.items():
            budget = layers * ASR_LAYER_BUDGET + asr.flush_label_steps(frames) * ASR_LABEL_STEP_BUDGET + ASR_FIXED_BUDGET
            assert ops <= budget, (frames, ops, budget)
        assert captured and all(asr._flushed[n] is out for n, out in captured.items())
    finally:
        asr.close()
