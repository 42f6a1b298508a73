"""End-of-utterance tokens (parakeet realtime EOU style): a final from feed(), then a clean restart."""

from __future__ import annotations

import torch

from asr_fixtures import TokenLog, offline_encoder, offline_rnnt_tokens, packets, tiny_eou_nemo  # noqa: F401
from duplex.events import TranscriptFinal, TranscriptPartial


def decode_with_resets(model, encoded, end_ids) -> list[int]:
    """Reference: NeMo's offline greedy decoding, restarted from scratch after every EOU token."""
    tokens, start = [], 0
    while start < encoded.size(1):
        part = offline_rnnt_tokens(model, encoded[:, start:])
        hits = [i for i, k in enumerate(part) if k in end_ids]
        if not hits:
            return tokens + part
        # where was the first EOU emitted? the frame whose decoding produced it
        first = hits[0]
        frame = _frame_of(model, encoded[:, start:], first)
        tokens += part[: first + 1]
        start += frame + 1
    return tokens


def _frame_of(model, encoded, index) -> int:
    """Frame at which NeMo's greedy decoding emits its ``index``-th token."""
    with torch.no_grad():
        hyp = model.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded[None], encoded_lengths=torch.tensor([encoded.size(1)]),
            return_hypotheses=True)[0]
    steps = hyp.timestamp["timestep"] if isinstance(hyp.timestamp, dict) else hyp.timestamp
    return int(steps[index])


async def test_eou_token_gives_final_and_resets(tiny_eou_nemo, jfk16):
    """The EOU model's <EOU>/<EOB> tokens end utterances from feed(): a final with eou=True holding the
    words since the previous one, and the next partial starts empty. Decoding restarts from scratch
    after each: the streamed tokens equal NeMo's offline greedy decoding restarted after every end
    token, while the encoder keeps its context (the offline encoder output of the whole signal)."""
    from duplex.asr.streaming import StreamingASR

    context = (70, 1)
    asr = StreamingASR(tiny_eou_nemo, context=context, max_batch=1)
    log = TokenLog(asr)
    stream = asr.new_stream()
    stream.state.encoded = []
    events = []
    for chunk in packets(jfk16, seed=7):
        events.extend(await stream.feed(chunk))
    finals = [e for e in events if isinstance(e, TranscriptFinal)]
    assert len(finals) >= 2 and all(f.eou for f in finals)
    end_ids = asr.vocab.end_ids
    assert {tiny_eou_nemo.tokenizer.ids_to_tokens([i])[0] for i in end_ids} == {"<EOU>", "<EOB>"}
    # every final holds exactly the words of the partials since the previous final
    last_partial = None
    for event in events:
        if isinstance(event, TranscriptPartial):
            last_partial = event
        elif last_partial is not None:
            assert event.text.startswith(last_partial.stable)
            assert "<" not in event.text
            last_partial = None
        else:  # a final right after another: words all decoded in one step
            assert event.text
    # after each final the next partial does not repeat the closed utterance's words
    for i, event in enumerate(events[:-1]):
        if isinstance(event, TranscriptFinal):
            nxt = events[i + 1]
            assert not isinstance(nxt, TranscriptPartial) or nxt.words[0].start >= event.words[-1].start
    encoded = torch.cat(stream.state.encoded, dim=1)
    _, offline = offline_encoder(tiny_eou_nemo, jfk16, context)
    assert (encoded - offline[:, : encoded.size(1)]).abs().max().item() < 1e-5
    assert log.of(stream) == decode_with_resets(tiny_eou_nemo, offline[:, : encoded.size(1)], end_ids)
    tail = await stream.endpoint()
    assert all(not f.eou for f in tail)
    await asr.aclose()


def test_static_decoding_emits_what_the_early_stopping_one_does(tiny_eou_nemo, jfk16):
    """RNNT greedy decoding as the captured ASR step runs it (every label step of every frame, no host
    sync) emits exactly the labels, and leaves exactly the decoding state, of the eager decoding that
    stops a frame at its first step without a label, over real speech with end-of-utterance resets,
    for a batch of sessions at different points and a frame left out by ``valid``."""
    from duplex.asr.decoding import RNNTGreedy
    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(tiny_eou_nemo, context=(70, 1), max_batch=4)
    encoded = offline_encoder(tiny_eou_nemo, jfk16[: 6 * 16000], (70, 1))[1][None]  # [1, D, T]
    decoder = asr.decoder
    assert isinstance(decoder, RNNTGreedy)
    slots = torch.tensor([0, 1, 2])
    emitted = resets = 0
    for start in range(0, encoded.size(2) - 8, 2):
        chunk = torch.stack([encoded[0, :, start:start + 2], encoded[0, :, start + 3:start + 5],
                             encoded[0, :, start + 6:start + 8]])  # three sessions, two frames each
        valid = torch.ones(3, 2, dtype=torch.bool)
        valid[2, 0] = False
        before = (decoder.g.clone(), decoder.h.clone(), decoder.c.clone())
        eager, commit_eager = decoder.labels(chunk, slots, valid, static=False)
        commit_eager()
        after = (decoder.g.clone(), decoder.h.clone(), decoder.c.clone())
        decoder.g, decoder.h, decoder.c = before
        static, commit_static = decoder.labels(chunk, slots, valid, static=True)
        commit_static()
        assert torch.equal(eager[:, :, : static.size(2)], static)
        assert all(torch.equal(a, b) for a, b in zip(after, (decoder.g, decoder.h, decoder.c)))
        emitted += int((static >= 0).sum())
        resets += int(torch.isin(static, decoder.reset_ids).sum())
    assert emitted > 10 and resets >= 1  # the comparison saw labels, and resets among them


def test_label_looping_decoding_emits_what_the_frame_looping_one_does(tiny_eou_nemo, jfk16):
    """The captured step's decoding, which loops over labels (each row on its own frame, a fixed
    number of label steps), emits exactly the labels, and leaves exactly the decoding state, of the
    frame-looping static decoding, over real speech with end-of-utterance resets, for three sessions
    at different points with a frame left out by ``valid``; it says a row is unfinished exactly when
    the row needs more label steps than it was given (one per frame without max_symbols labels, plus
    one per label), from one step per frame up to every label step of every frame."""
    from duplex.asr.decoding import RNNTGreedy
    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(tiny_eou_nemo, context=(70, 1), max_batch=4)
    encoded = offline_encoder(tiny_eou_nemo, jfk16[: 6 * 16000], (70, 1))[1][None]  # [1, D, T]
    decoder = asr.decoder
    assert isinstance(decoder, RNNTGreedy)
    frames, symbols = 2, decoder.max_symbols
    slots = torch.tensor([0, 1, 2])
    finished = unfinished = resets = 0
    for i, start in enumerate(range(0, encoded.size(2) - 8, 2)):
        chunk = torch.stack([encoded[0, :, start:start + 2], encoded[0, :, start + 3:start + 5],
                             encoded[0, :, start + 6:start + 8]])  # three sessions, two frames each
        valid = torch.ones(3, 2, dtype=torch.bool)
        valid[2, 0] = False
        steps = frames + i % (frames * symbols - frames + 1)  # 2 .. every label step of every frame
        before = (decoder.g.clone(), decoder.h.clone(), decoder.c.clone())
        static, commit_static = decoder.labels(chunk, slots, valid, static=True)
        commit_static()
        after = (decoder.g.clone(), decoder.h.clone(), decoder.c.clone())
        decoder.g, decoder.h, decoder.c = (t.clone() for t in before)
        looped, commit_looped = decoder.loop_labels(chunk, slots, valid, steps)
        rows = RNNTGreedy.loop_tokens(looped)
        reference = RNNTGreedy.tokens(static)
        for r, tokens in enumerate(rows):
            per_frame = (static[r] >= 0).sum(dim=1)  # labels of each frame
            needed = sum(min(symbols, int(n) + 1) for n, ok in zip(per_frame, valid[r]) if ok)
            assert (tokens is not None) == (needed <= steps), (start, r, needed, steps)
            if tokens is not None:
                assert tokens == reference[r]
                finished += 1
            else:
                unfinished += 1
        if all(tokens is not None for tokens in rows):
            commit_looped()
            assert all(torch.equal(a, b) for a, b in zip(after, (decoder.g, decoder.h, decoder.c)))
        decoder.g, decoder.h, decoder.c = after
        resets += int(torch.isin(static, decoder.reset_ids).sum())
    assert finished > 20 and unfinished > 5 and resets >= 1  # both outcomes seen, and resets among the labels
