"""The streaming Mimi codec equals one-shot Mimi: decoder at any chunk size, encoder on uneven blocks."""

from __future__ import annotations

import pytest
import torch

from duplex.tts.codec import StreamingDecoder, StreamingEncoder
from tts_fixtures import one_torch_thread, relative_error, tiny_codec, tiny_tts_checkpoint  # noqa: F401

FRAMES = 23  # 46 transformer steps at 25 Hz: far past the tiny codec's 8-step attention window


@pytest.fixture(scope="module")
def codes(tiny_codec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_codec.config.codebook_size, (1, tiny_codec.config.num_quantizers, FRAMES),
                         generator=generator)


@pytest.fixture(scope="module")
def one_shot(tiny_codec, codes) -> torch.Tensor:
    return tiny_codec.decode(codes).audio_values[:, 0]  # [1, FRAMES * 1920]


def decode_in_chunks(decoder: StreamingDecoder, codes: torch.Tensor, size: int, fresh_state=None) -> torch.Tensor:
    state = decoder.new_state()
    out = []
    for start in range(0, codes.shape[-1], size):
        if fresh_state is not None and start:
            fresh_state(state, decoder)
        out.append(decoder.decode(codes[..., start:start + size], state))
    return torch.cat(out, dim=-1)


def test_codebooks_hold_noise(tiny_codec):
    """The tiny codec's codebooks are random (distinct codes decode differently), not all-zero."""
    embed = tiny_codec.quantizer.semantic_residual_vector_quantizer.layers[0].codebook.embed
    assert embed.abs().sum() > 0
    assert torch.cdist(embed, embed).fill_diagonal_(1.0).min() > 0.1


def test_the_code_table_is_mimis_quantizer_decode(tiny_codec):
    """One lookup in the projected table, summed over codebooks, gives Mimi's own quantizer decode
    (its per-codebook loop, both groups' output projections, their sum) to float rounding, for every
    codebook and rows of different codes."""
    import torch.nn.functional as F

    from duplex.tts.codec import code_table

    k, v = tiny_codec.config.num_quantizers, tiny_codec.config.codebook_size
    codes = torch.randint(0, v, (3, k, 4), generator=torch.Generator().manual_seed(2))
    table, offsets = code_table(tiny_codec.quantizer)
    assert table.shape == (k * v, tiny_codec.config.hidden_size)
    with torch.no_grad():
        mimi = tiny_codec.quantizer.decode(codes)  # [B, C, T]
        ours = F.embedding(codes + offsets, table).sum(dim=1).transpose(1, 2)
    assert ours.shape == mimi.shape
    assert relative_error(ours, mimi) < 1e-6


@pytest.mark.parametrize("size", [1, 2, 5])
def test_streaming_decode_equals_one_shot(tiny_codec, codes, one_shot, size):
    """Decoding 1, 2 or 5 frames per call gives one-shot MimiModel.decode's samples to 1e-5 relative,
    while the transformer's KV cache stays bounded by its attention window: a ring with room for 3
    positions a call, so it wraps around many times and longer calls run in pieces of 3."""
    decoder = StreamingDecoder(tiny_codec)
    state = decoder.new_state(steps=3)
    streamed = torch.cat([decoder.decode(codes[..., i:i + size], state) for i in range(0, FRAMES, size)], dim=-1)
    assert streamed.shape == one_shot.shape == (1, FRAMES * decoder.frame_size)
    assert one_shot.abs().max() > 1e-3  # a real signal, not silence
    assert relative_error(streamed, one_shot) < 1e-5
    window = tiny_codec.config.sliding_window
    assert 2 * FRAMES > window + state.kv.steps  # the ring wrapped around: every column was rewritten
    assert all(t.shape[3] == window - 1 + state.kv.steps for t in state.kv.kv)
    assert state.kv.position == 2 * FRAMES and state.frames == FRAMES


def test_independent_chunks_differ(tiny_codec, codes, one_shot):
    """Negative control: decoding each 2-frame chunk from a fresh state (what stateless decoding does)
    does not match one-shot decoding."""
    decoder = StreamingDecoder(tiny_codec)
    chunks = torch.cat([decoder.decode(codes[..., i:i + 2], decoder.new_state()) for i in range(0, FRAMES, 2)], -1)
    assert relative_error(chunks, one_shot) > 1e-2


def _drop_conv_context(state, decoder):
    state.conv_context.clear()


def _drop_overlap(state, decoder):
    state.overlap.clear()


def _drop_kv(state, decoder):
    state.kv.valid = 0  # the cached keys become invisible; positions run on


@pytest.mark.parametrize("drop", [_drop_conv_context, _drop_overlap, _drop_kv], ids=["conv", "overlap", "kv"])
def test_every_piece_of_state_matters(tiny_codec, codes, one_shot, drop):
    """Forgetting any one kind of state between chunks (conv left context, transposed-conv tails, the
    attention window) breaks the equality: each is needed."""
    decoder = StreamingDecoder(tiny_codec)
    assert relative_error(decode_in_chunks(decoder, codes, 2, drop), one_shot) > 1e-4


def test_state_copy_replays_identically(tiny_codec, codes):
    """A copied decoder state continues exactly like the original (snapshot for rollback)."""
    decoder = StreamingDecoder(tiny_codec)
    state = decoder.new_state()
    decoder.decode(codes[..., :7], state)
    snapshot = state.copy()
    a = decoder.decode(codes[..., 7:12], state)
    b = decoder.decode(codes[..., 7:12], snapshot)
    assert torch.equal(a, b)


def test_streaming_encoder_equals_one_shot(tiny_codec):
    """Audio fed in uneven blocks (not frame multiples) encodes to one-shot MimiModel.encode's latents
    (1e-5 relative) and codes."""
    frames = 12
    audio = 0.3 * torch.randn(1, frames * 1920, generator=torch.Generator().manual_seed(2))
    ref_latents = tiny_codec.encoder(audio[:, None]).latents
    ref_codes = tiny_codec.encode(audio[:, None]).audio_codes
    encoder = StreamingEncoder(tiny_codec)
    state = encoder.new_state()
    latents = torch.cat([encoder.latents(audio[:, i:i + 1000], state) for i in range(0, audio.shape[-1], 1000)], -1)
    assert latents.shape == ref_latents.shape
    assert relative_error(latents, ref_latents) < 1e-5
    state = encoder.new_state()
    codes = torch.cat([encoder.encode(audio[:, i:i + 2500], state) for i in range(0, audio.shape[-1], 2500)], -1)
    assert torch.equal(codes, ref_codes)
    assert state.pending.shape[-1] == 0  # every sample was consumed


def _slot_decode(slots, codes: torch.Tensor, row: int, commit_mask: list[bool]) -> list[torch.Tensor]:
    """Step ``codes`` ``[1, K, T]`` frame by frame through row ``row`` of ``slots`` (rows below it
    step padding frames that never commit); returns each step's audio of that row."""
    out = []
    for t in range(codes.shape[-1]):
        frames = torch.zeros(row + 1, codes.shape[1], dtype=torch.long)
        frames[row] = codes[0, :, t]
        commit = torch.zeros(row + 1, dtype=torch.bool)
        commit[row] = commit_mask[t]
        out.append(slots.step(frames, commit)[row])
    return out


def test_slot_decoder_equals_streaming_decode_in_any_row(tiny_codec, codes, one_shot):
    """The frame step's decoder, one frame a step over static rows, gives one-shot MimiModel.decode's
    samples to 1e-5 relative in whichever row the stream lives, next to rows that never commit (the
    padding of a bucket), and a row reset for a new stream starts as a fresh decoder does."""
    from duplex.tts.slot_codec import SlotDecoder

    slots = SlotDecoder(tiny_codec, rows=4)
    for row in (0, 2):
        slots.reset(row)
        audio = torch.cat(_slot_decode(slots, codes, row, [True] * FRAMES))
        assert relative_error(audio, one_shot[0]) < 1e-5
    assert int(slots.position[1]) == 0 and int(slots.valid[1]) == 0  # the padding rows moved nothing


def test_a_frame_not_committed_leaves_the_stream_as_it_was(tiny_codec, codes, one_shot):
    """An uncommitted step (the end-of-audio frame) is decoded but not taken into the state: the frames
    after it sound exactly as if it had never been there. Negative control: committing it changes them."""
    from duplex.tts.slot_codec import SlotDecoder

    end = torch.zeros(1, codes.shape[1], 1, dtype=torch.long)  # the all-zero end frame, after frame 5
    with_end = torch.cat([codes[..., :5], end, codes[..., 5:]], dim=-1)
    slots = SlotDecoder(tiny_codec, rows=2)
    slots.reset(1)
    audio = _slot_decode(slots, with_end, 1, [t != 5 for t in range(FRAMES + 1)])
    kept = torch.cat(audio[:5] + audio[6:])
    assert relative_error(kept, one_shot[0]) < 1e-5
    slots.reset(1)
    committed = _slot_decode(slots, with_end, 1, [True] * (FRAMES + 1))
    assert relative_error(torch.cat(committed[6:]), one_shot[0, 5 * 1920:]) > 1e-3
