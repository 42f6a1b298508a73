"""The frame-by-frame CSM engine: same codes as transformers' own CSM generate, seeded sampling, and a
context that is rebuilt (not overflowed) when a long reply runs out of positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplex.tts.engine import Sampling
from duplex.tts.voice import check_voice
from tts_fixtures import one_torch_thread, jfk24, make_engine, tiny_tts_checkpoint, voice_a  # noqa: F401

GREEDY = Sampling(temperature=0.0)
TEXT = "Hello there, how are you?"


def run_segment(engine, reply, text: str, frames: int, stop_at_eos: bool = False) -> list[np.ndarray]:
    engine.begin_segment(reply, text, frames, stop_at_eos=stop_at_eos)
    audio = []
    while True:
        step = engine.step(reply)
        if step.pcm is not None:
            audio.append(step.pcm)
        if step.done:
            return audio


def hf_greedy(model, input_ids, frames: int, **kwargs) -> torch.Tensor:
    """transformers' CSM generate, greedy, never choosing the 3 non-audio ids of each codebook."""
    extra = list(range(model.config.codec_config.codebook_size, model.config.vocab_size))
    ids = torch.tensor([input_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=frames, do_sample=False,
                         depth_decoder_do_sample=False, suppress_tokens=extra,
                         depth_decoder_suppress_tokens=extra, **kwargs)
    return out[0]  # [frames, K]


def test_greedy_codes_equal_transformers_generate(make_engine, tiny_tts_checkpoint):
    """Greedy frame-by-frame generation makes the frames CsmForConditionalGeneration.generate makes from
    the same prompt (backbone, depth decoder and prompt format all agree)."""
    model, _ = tiny_tts_checkpoint
    engine = make_engine(sampling=GREEDY)
    reply = engine.new_reply(None, seed=0, chunk_frames=3)
    audio = run_segment(engine, reply, TEXT, 10)
    ours = torch.stack(reply.frames)
    assert ours.shape == (10, engine.num_codebooks)
    assert torch.equal(ours, hf_greedy(model, engine.text_ids(TEXT), 10))
    assert sum(len(a) for a in audio) == 10 * engine.frame_size


def test_voice_prompt_codes_equal_transformers_generate(make_engine, tiny_tts_checkpoint, voice_a):
    """With a voice prompt (its frames from the streaming encoder, its KV prefix cached) generation
    equals transformers' generate on the processor's layout: voice text, audio frames, audio end, text."""
    model, _ = tiny_tts_checkpoint
    engine = make_engine(sampling=GREEDY)
    pcm = check_voice(voice_a)
    voice = engine.encode_voice(pcm, voice_a.text)
    padded = np.pad(pcm, (0, (-len(pcm)) % engine.frame_size))
    assert voice.frames == len(padded) // engine.frame_size
    cfg = model.config
    ids = (engine.text_ids(voice_a.text) + [cfg.audio_token_id] * voice.frames + [cfg.audio_eos_token_id]
           + engine.text_ids(TEXT))
    reference = hf_greedy(model, ids, 8, input_values=torch.from_numpy(padded)[None, None],
                          input_values_cutoffs=torch.tensor([[len(padded)]]))
    for _ in range(2):  # the second reply reuses the cached prefix
        reply = engine.new_reply(voice, seed=0, chunk_frames=2)
        run_segment(engine, reply, TEXT, 8)
        assert torch.equal(torch.stack(reply.frames), reference)
    assert voice.prefix is not None


def test_sampling_follows_the_seed(make_engine):
    """Sampling with one seed repeats exactly; another seed (control) gives other codes."""
    engine = make_engine()

    def codes(seed: int) -> torch.Tensor:
        reply = engine.new_reply(None, seed=seed, chunk_frames=2)
        run_segment(engine, reply, TEXT, 6)
        return torch.stack(reply.frames)

    assert torch.equal(codes(5), codes(5))
    assert not torch.equal(codes(5), codes(6))


def test_sampled_codes_are_decodable(make_engine):
    """Sampled codes stay inside the codebooks (the LM's 3 extra ids per codebook are never drawn)."""
    engine = make_engine(sampling=Sampling(temperature=5.0, top_k=0))  # flat: every id is likely
    reply = engine.new_reply(None, seed=0, chunk_frames=4)
    run_segment(engine, reply, TEXT, 16)
    frames = torch.stack(reply.frames)
    assert int(frames.max()) < engine.codebook_size and int(frames.min()) >= 0


def test_long_reply_rebuilds_its_context(make_engine):
    """When the next segment would overflow the positions, the context restarts from the voice prefix (none
    here) plus the newest segments that fit, so a long reply keeps speaking within the model's limit."""
    engine = make_engine()
    engine.max_positions = 110  # a segment below costs 33 text ids + 10 frames + 1 end frame
    reply = engine.new_reply(None, seed=0, chunk_frames=5)
    longest = 0
    for index in range(6):
        run_segment(engine, reply, f"Sentence number {index} is here.", 10)
        longest = max(longest, reply.length + 2)  # + the staged last frame and the end frame still to run
        assert reply.length + 2 <= engine.max_positions
    assert len(reply.frames) == 6 * 10
    assert 1 < len(reply.history) < 6  # the oldest segments were dropped, the newest kept as context
    assert longest > engine.max_positions - 44  # it filled up before it was rebuilt


def test_an_end_frame_mid_reply_leaves_no_trace_in_its_audio(make_engine):
    """A segment that ends on the model's end-of-audio frame: the frame step decodes that frame too (the
    host learns it is the end only from the step's one copy), yet the reply's audio, its next segment
    included, equals decoding the frames it kept in one go (1e-5): the end frame's audio is dropped and
    the codec state never took it in. The end frame is forced by zeroing the codebook heads for a step."""
    from duplex.tts.codec import StreamingDecoder

    engine = make_engine(sampling=GREEDY)
    reply = engine.new_reply(None, seed=0, chunk_frames=2)
    engine.begin_segment(reply, TEXT, 20, stop_at_eos=True)
    audio = []
    for _ in range(3):
        step = engine.step(reply)
        assert not step.done
        audio += [step.pcm] if step.pcm is not None else []
    heads = [engine.model.lm_head.weight, engine.codebook_heads]
    saved = [h.clone() for h in heads]
    for h in heads:
        h.zero_()  # every logit 0: greedy draws code 0 in every codebook, the end frame
    try:
        step = engine.step(reply)
    finally:
        for h, s in zip(heads, saved):
            h.copy_(s)
    assert step.done and step.segment_frames == 3 and len(reply.frames) == 3
    assert step.pcm is not None and step.pcm.shape == (engine.frame_size,)  # the third frame, its chunk cut short
    audio.append(step.pcm)
    audio += run_segment(engine, reply, "And then more.", 4)
    decoder = StreamingDecoder(engine.model.codec_model)
    expected = decoder.decode(torch.stack(reply.frames).T[None], decoder.new_state())[0]
    assert len(reply.frames) == 7
    assert np.abs(np.concatenate(audio) - expected.clamp(-1, 1).numpy()).max() < 1e-5 * float(expected.abs().max())


@pytest.mark.slow
def test_a_frame_of_compiled_layers_makes_the_plain_frames_codes(request, make_engine):
    """The frame step with its backbone and depth layers and its draws compiled by Inductor (what a
    GPU runs with --compile), here on the CPU's Inductor, makes the seeded reply's codes the plain
    step makes and its audio to float rounding: the shapes only the TTS traces (the backbone's
    segment prefill and its frames over a length bucket, the depth decoder's first step of two
    positions under its mask, the later steps with their RoPE in their weights and no mask) compile
    whole. It cannot show a GPU's own kernels. (About a minute of compiling; needs a C++ compiler.)"""
    import shutil

    from duplex.engine import fusion
    from duplex.engine.sampling import race

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (apt-get install g++)")
    patch = torch._dynamo.config.patch(suppress_errors=False)  # a graph break fails, not falls back
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))
    torch._dynamo.reset()
    plain, fused = make_engine(), make_engine()
    fused.backbone.compile()
    fused.depth.compile()
    fused._race = fusion.compile_fn(race)
    made = []
    for engine in (plain, fused):
        reply = engine.new_reply(None, seed=3, chunk_frames=2)
        audio = np.concatenate(run_segment(engine, reply, TEXT, 6))
        made.append((torch.stack(reply.frames), audio))
    (plain_codes, plain_audio), (fused_codes, fused_audio) = made
    assert torch.equal(fused_codes, plain_codes)
    assert np.abs(fused_audio - plain_audio).max() <= 1e-4 * max(1e-3, np.abs(plain_audio).max())
