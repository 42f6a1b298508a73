"""Live streaming equals offline: encoder outputs, RNNT and CTC tokens, partials, finals, endpoints."""

from __future__ import annotations

import pytest
import torch

from asr_fixtures import (  # noqa: F401 (fixtures)
    CONTEXTS, TokenLog, offline_ctc_tokens, offline_encoder, offline_rnnt_tokens, packets, stream_all, tiny_nemo,
)
from duplex.events import TranscriptFinal, TranscriptPartial


def make(model, context, head=None, fast=True):
    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(model, context=context, decoder=head, max_batch=4, fast=fast)
    return asr, TokenLog(asr)


@pytest.mark.parametrize("context", CONTEXTS, ids=lambda c: f"{c[0]}-{c[1]}")
async def test_encoder_and_rnnt_tokens_equal_offline(tiny_nemo, jfk16, context):
    """Fed in random 10-20 ms packets, every chunk's encoder output equals the offline encoder's (same
    attention context) to 1e-5, for [70,0] (first chunk of one mel frame, short pre-encode cache)
    through [70,13]; and the RNNT tokens are exactly NeMo's offline greedy tokens."""
    asr, log = make(tiny_nemo, context, "rnnt")
    stream = asr.new_stream()
    stream.state.encoded = []
    await stream_all(stream, packets(jfk16, seed=sum(context)))
    live = torch.cat(stream.state.encoded, dim=1)
    _, offline = offline_encoder(tiny_nemo, jfk16, context)
    frames = live.size(1)
    assert frames >= offline.size(1) - (context[1] + 2)  # every full chunk of the file was streamed
    assert (live - offline[:, :frames]).abs().max().item() < 1e-5
    reference = offline_rnnt_tokens(tiny_nemo, offline[:, :frames])
    assert len(reference) > 10  # the comparison has something to compare
    assert log.of(stream) == reference
    await stream.aclose()
    await asr.aclose()


@pytest.mark.parametrize("context", [(70, 0), (70, 6)], ids=lambda c: f"{c[0]}-{c[1]}")
async def test_ctc_head_tokens_equal_offline(tiny_nemo, jfk16, context):
    """The hybrid model's CTC head, streamed, gives NeMo's offline greedy CTC tokens (repeats collapse
    across chunk boundaries)."""
    asr, log = make(tiny_nemo, context, "ctc")
    stream = asr.new_stream()
    stream.state.encoded = []
    await stream_all(stream, packets(jfk16, seed=3))
    frames = sum(e.size(1) for e in stream.state.encoded)
    _, offline = offline_encoder(tiny_nemo, jfk16, context)
    reference = offline_ctc_tokens(tiny_nemo, offline[:, :frames])
    assert len(reference) > 5
    assert log.of(stream) == reference
    await asr.aclose()


async def test_partials_stable_prefix_and_final(tiny_nemo, jfk16):
    """Partials: the stable prefix only ever grows (never changes), stream times only increase and
    never pass the audio fed, words lie inside it in order; the blank history is the audio decoded
    since the last token; the final at the endpoint holds every word recognised (the tokenizer's own
    text of the tokens)."""
    asr, log = make(tiny_nemo, (70, 1), "rnnt")
    stream = asr.new_stream()
    fed, events = 0, []
    for chunk in packets(jfk16, seed=5):
        fed += chunk.size
        for event in await stream.feed(chunk):
            assert event.stream_samples <= fed
            events.append(event)
    partials = [e for e in events if isinstance(e, TranscriptPartial)]
    assert len(partials) > 3 and not any(isinstance(e, TranscriptFinal) for e in events)
    for a, b in zip(partials, partials[1:]):
        assert b.stream_samples >= a.stream_samples and b.wall >= a.wall
        assert b.stable.split()[: len(a.stable.split())] == a.stable.split()
        assert (a.stable + " " + a.unstable).split()[:-1] == a.stable.split() or not a.unstable
    for p in partials:
        assert all(0 <= w.start < w.end <= p.stream_samples + 2000 for w in p.words)
        assert [w.start for w in p.words] == sorted(w.start for w in p.words)
    frames = log.frames(stream)
    assert stream.trailing_blank_s == pytest.approx((stream.state.n_enc - 1 - frames[-1]) * 0.08)
    finals = await stream.endpoint()
    assert len(finals) == 1 and not finals[0].eou
    final = finals[0]
    expected = tiny_nemo.tokenizer.ids_to_text(log.of(stream, flushed=True)).split()
    assert final.text.split() == expected
    assert final.text.startswith(partials[-1].stable)
    assert final.stream_samples == jfk16.size
    assert await stream.endpoint() == []  # nothing new since
    await asr.aclose()


async def test_endpoint_resets_decoding_and_keeps_encoder_context(tiny_nemo, jfk16):
    """After an endpoint mid-stream: the encoder keeps its left context (outputs still equal the offline
    encoder's over the whole signal), the frames the flush already decoded are not decoded again,
    and decoding restarts clean: the tokens after it are NeMo's offline greedy tokens of the encoder
    output from that frame on, decoded from a fresh start."""
    context = (70, 6)
    asr, log = make(tiny_nemo, context, "rnnt")
    stream = asr.new_stream()
    stream.state.encoded = []
    chunks = packets(jfk16, seed=9)
    half = len(chunks) // 2
    before = await stream_all(stream, chunks[:half])
    n_before = len(log.of(stream))
    finals = await stream.endpoint()
    skip = stream.state.skip_until
    assert skip > stream.state.n_enc  # the flush decoded audio beyond the last chunk
    assert finals and finals[-1].text
    partial_words = [e for e in before if isinstance(e, TranscriptPartial)][-1].text.split()
    assert finals[-1].text.split()[: len(partial_words) - 1] == partial_words[:-1]
    after = await stream_all(stream, chunks[half:])
    live = torch.cat(stream.state.encoded, dim=1)
    _, offline = offline_encoder(tiny_nemo, jfk16, context)
    assert (live - offline[:, : live.size(1)]).abs().max().item() < 1e-5
    reference = offline_rnnt_tokens(tiny_nemo, offline[:, skip: live.size(1)])
    assert len(reference) > 5
    assert log.of(stream)[n_before:] == reference
    # the new utterance's partials start from nothing: no word of the closed one carried over
    first_after = next(e for e in after if isinstance(e, TranscriptPartial))
    assert first_after.words[0].start >= skip * 8 * 160 - 8 * 160
    await asr.aclose()


@pytest.mark.parametrize("context", [(70, 0), (70, 13)], ids=lambda c: f"{c[0]}-{c[1]}")
async def test_cached_keys_step_equals_nemo_step(tiny_nemo, jfk16, context):
    """The fast step (projected keys/values cached, positions projected once) and NeMo's own streaming
    forward give the same chunk outputs (to 1e-5; both equal offline), the same tokens, and the same
    endpoint flush; the tiny model takes the fast step by default."""
    results = {}
    for fast in (True, False):
        asr, log = make(tiny_nemo, context, "rnnt", fast=fast)
        assert asr.fast == fast
        stream = asr.new_stream()
        stream.state.encoded = []
        chunks = packets(jfk16[: 6 * 16000], seed=11)
        await stream_all(stream, chunks[: len(chunks) // 2])
        finals = await stream.endpoint()
        await stream_all(stream, chunks[len(chunks) // 2:])
        results[fast] = torch.cat(stream.state.encoded, dim=1), log.of(stream, flushed=True), finals
        await asr.aclose()
    (enc_fast, tok_fast, fin_fast), (enc_nemo, tok_nemo, fin_nemo) = results[True], results[False]
    assert (enc_fast - enc_nemo).abs().max().item() < 1e-5
    assert tok_fast == tok_nemo and len(tok_fast) > 5
    assert [f.text for f in fin_fast] == [f.text for f in fin_nemo]
    _, offline = offline_encoder(tiny_nemo, jfk16[: 6 * 16000], context)
    assert (enc_nemo - offline[:, : enc_nemo.size(1)]).abs().max().item() < 1e-5


async def test_a_feed_short_of_samples_short_does_no_work_and_one_reaching_it_steps(tiny_nemo, vad_model, jfk16):
    """``samples_short`` is what a frontend across the engine core's socket relies on to hold blocks
    back: for the ASR and the VAD, feeding fewer samples than it says returns nothing and submits no
    step (the model's scheduler ticks no more), and feeding up to it steps at once. Checked at every
    stage of a stream: its first chunk, later ones, after an endpoint, and across random packets."""
    asr, _ = make(tiny_nemo, (70, 1), "rnnt")
    for stream, scheduler in ((asr.new_stream(), asr._batch), (vad_model.new_stream(), vad_model.worker)):
        pos, steps = 0, 0
        for round_ in range(6):
            short = stream.samples_short()
            assert short >= 1
            ticks = scheduler.ticks
            if short > 1:
                assert await stream.feed(jfk16[pos:pos + short - 1]) == []
                pos += short - 1
                assert scheduler.ticks == ticks and stream.samples_short() == 1
            await stream.feed(jfk16[pos:pos + 1])
            pos += 1
            assert scheduler.ticks > ticks  # the sample that completes the window or chunk steps
            steps += 1
            if round_ == 2 and hasattr(stream, "endpoint"):
                await stream.endpoint()
        assert steps == 6
        await stream.aclose()
