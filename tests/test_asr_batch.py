"""One model serving many sessions: batched steps give each session exactly what it gets alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from asr_fixtures import TokenLog, packets, stream_all, tiny_nemo  # noqa: F401 (fixture)


async def alone(model, context, pcm, seed):
    """Encoder output [D, T] and tokens of one session served by a model of its own."""
    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(model, context=context, decoder="rnnt", max_batch=1)
    log = TokenLog(asr)
    stream = asr.new_stream()
    stream.state.encoded = []
    for chunk in packets(pcm, seed=seed):
        await stream.feed(chunk)
    await asr.aclose()
    return torch.cat(stream.state.encoded, dim=1), log.of(stream)


@pytest.mark.parametrize("context", [(70, 0), (70, 6)], ids=lambda c: f"{c[0]}-{c[1]}")
async def test_sessions_started_at_different_times_batch_exactly(tiny_nemo, jfk16, context):
    """Four sessions share one model, fed 20 ms packets together: B starts two chunk periods after A,
    C five, A leaves half-way and D joins later on A's freed slot. Steps batch first chunks
    (and at [70,0] the short second chunk) with later ones, and sessions whose caches are filled to
    different levels. Each session's encoder output equals its run alone (fed random packets) to
    1e-5, and its tokens are identical."""
    from duplex.asr.streaming import StreamingASR

    rate = 16000
    audio = {  # each session hears a different stretch of speech
        "A": jfk16[: 6 * rate],
        "B": jfk16[2 * rate: 10 * rate],
        "C": jfk16[4 * rate:],
        "D": np.concatenate([jfk16[7 * rate:], jfk16[: 2 * rate]]),
    }
    asr = StreamingASR(tiny_nemo, context=context, decoder="rnnt", max_batch=8)
    period = asr.plan.mel * asr.spec.hop // 320  # 20 ms packets per chunk
    start = {"A": 0, "B": 2 * period, "C": 5 * period, "D": 0}  # in packets: chunk steps coincide
    log = TokenLog(asr)
    streams = {}
    queues = {name: [pcm[i:i + 320] for i in range(0, pcm.size, 320)] for name, pcm in audio.items()}
    tick, a_left = 0, False
    while any(queues.values()):
        for name in audio:  # join when it is time (D once A has left)
            if name not in streams and tick >= start[name] and (name != "D" or a_left):
                streams[name] = asr.new_stream()
                streams[name].state.encoded = []
        ready = [name for name in streams if queues[name]]
        await asyncio.gather(*(streams[n].feed(queues[n].pop(0)) for n in ready))
        if not a_left and not queues["A"]:  # A leaves: its slot is freed for D
            await streams["A"].aclose()
            a_left = True
        tick += 1
    assert max(asr.scheduler.batch_sizes()) >= 3
    mixed = [s for s in log.steps if 0 in s and any(n > 0 for n in s)]
    assert mixed, "no step batched a first chunk with later ones"
    for name, stream in streams.items():
        encoded = torch.cat(stream.state.encoded, dim=1)
        ref_encoded, ref_tokens = await alone(tiny_nemo, context, audio[name], list(audio).index(name))
        assert encoded.shape == ref_encoded.shape
        assert (encoded - ref_encoded).abs().max().item() < 1e-5, name
        assert log.of(stream) == ref_tokens, name
        assert len(ref_tokens) > 3
    assert streams["D"].state.slot == 0  # D reused A's slot: its caches were reset, not inherited
    await asr.aclose()


@pytest.mark.parametrize("context", [(70, 0), (70, 6)], ids=lambda c: f"{c[0]}-{c[1]}")
async def test_the_captured_decoding_gives_the_tokens_of_the_eager_one(tiny_nemo, jfk16, context):
    """The steady step as a GPU captures it (rehearsed on the CPU), whose decoding loops over labels in
    a fixed number of label steps (here one or four more than the chunk's frames), for three sessions started
    at different times: a chunk that emits more labels than that is decoded again by the second
    captured step, and every session's tokens equal its run alone, decoded eagerly frame by frame.
    Both outcomes occur."""
    from duplex.asr.streaming import StreamingASR

    rate = 16000
    audio = {"A": jfk16[: 5 * rate], "B": jfk16[2 * rate: 7 * rate], "C": jfk16[5 * rate:]}
    out, more = {(70, 0): (1, 1), (70, 6): (7, 4)}[context]  # encoder frames per chunk, room for labels
    asr = StreamingASR(tiny_nemo, context=context, decoder="rnnt", max_batch=4, label_steps=out + more)
    assert asr.plan.out == out and asr.label_steps == out + more
    asr.graphs.rehearse = True  # each bucket's capture call made as a GPU makes it at load, then used
    await asr.warm_up()
    log = TokenLog(asr)
    streams = {name: asr.new_stream() for name in audio}
    period = asr.plan.mel * asr.spec.hop // 320  # 20 ms packets per chunk
    queues = {name: [pcm[i:i + 320] for i in range(0, pcm.size, 320)] for name, pcm in audio.items()}
    for i, name in enumerate(audio):
        queues[name] = [np.zeros(0, dtype=np.float32)] * (i * period) + queues[name]  # joins later
    while any(queues.values()):
        ready = [name for name in audio if queues[name]]
        await asyncio.gather(*(streams[n].feed(queues[n].pop(0)) for n in ready))
    assert 0 < asr.redecoded < asr.steady_steps, (asr.redecoded, asr.steady_steps)
    assert max(asr.scheduler.batch_sizes()) >= 2
    for name, stream in streams.items():
        _, ref_tokens = await alone(tiny_nemo, context, audio[name], list(audio).index(name))
        assert log.of(stream) == ref_tokens, name
        assert len(ref_tokens) > 3
    await asr.aclose()


@pytest.mark.parametrize("context", [(70, 0), (70, 6)], ids=lambda c: f"{c[0]}-{c[1]}")
async def test_the_captured_flush_gives_the_tokens_of_the_eager_one(tiny_nemo, jfk16, context):
    """An endpoint's flush as a GPU captures it (rehearsed on the CPU: the frames after the stream's
    last chunk encoded and decoded by label looping, one step per number of frames) gives the tokens,
    at the frames, of the eager flush (frame by frame, each frame stopping at its first blank): at
    cuts 40 ms apart over a chunk and more, so every number of frames a stream holds is flushed, and
    flushed again 0.3 s later (the frames the first flush covered are skipped). With little room for
    labels, some flushes emit more than their label steps allow: decoded again by the second captured
    step, exactly. Both occur."""
    from duplex.asr.streaming import StreamingASR

    out, more = {(70, 0): (1, 1), (70, 6): (7, 4)}[context]  # encoder frames per chunk, room for labels
    captured = StreamingASR(tiny_nemo, context=context, decoder="rnnt", max_batch=2, label_steps=out + more)
    captured.graphs.rehearse = True  # each capture call made as a GPU makes it at load, then used
    await captured.warm_up()
    assert captured.flushes.lengths == tuple(range(1, 2 * out + 2))  # every length the caches take
    lengths: list[int] = []
    run = captured.flushes.run
    captured.flushes.run = lambda rows, needed: lengths.append(needed) or run(rows, needed)
    eager = StreamingASR(tiny_nemo, context=context, decoder="rnnt", max_batch=2)
    await eager.warm_up()
    logs = {asr: TokenLog(asr) for asr in (captured, eager)}
    found: dict[StreamingASR, list] = {captured: [], eager: []}
    for k in range(16):
        cut = 16000 + 640 * k
        for asr in (captured, eager):  # one after the other: the two share the NeMo model
            stream = asr.new_stream()
            await stream_all(stream, packets(jfk16[:cut], seed=k))
            finals = await stream.endpoint()
            await stream_all(stream, packets(jfk16[cut:cut + 4800], seed=k + 1))
            finals += await stream.endpoint()
            # (taken out of the log: a later stream's state may be given the same id)
            found[asr].append(([f.text for f in finals], logs[asr].tokens.pop(id(stream.state), None)))
            await stream.aclose()
    assert found[captured] == found[eager]
    assert captured.captured_flushes == len(lengths) >= 24 and eager.captured_flushes == 0
    assert len(set(lengths)) >= min(out, 4), sorted(set(lengths))
    assert 0 < captured.flushes_decoded_again < captured.captured_flushes
    assert sum(kind == "flush" for _, tokens in found[eager] for kind, _, _ in tokens or []) >= 10
    await captured.aclose()
    await eager.aclose()


@pytest.mark.parametrize("where", ["pre-encode", "decoder"])
async def test_a_failing_session_ends_alone_and_the_others_stay_exact(tiny_nemo, jfk16, where):
    """Three sessions share ASR steps; from its fourth chunk on, C's step fails: its pre-encode cache
    is corrupt (it fails before the encoder runs), or its decoder raises (after the encoder has run
    for the whole batch). Only C gets the error. The batch is re-run row by row, and that is exact,
    because no session's state changes until the whole batch has run: A's and B's encoder outputs
    equal their runs alone to 1e-5, and their tokens are identical."""
    from duplex.asr.streaming import StreamingASR

    rate = 16000
    audio = {"A": jfk16[: 5 * rate], "B": jfk16[3 * rate: 8 * rate], "C": jfk16[1 * rate: 6 * rate]}
    asr = StreamingASR(tiny_nemo, context=(70, 0), decoder="rnnt", max_batch=8)
    log = TokenLog(asr)
    streams = {name: asr.new_stream() for name in audio}
    for stream in streams.values():
        stream.state.encoded = []
    bad = streams["C"].state
    if where == "decoder":
        labels = asr.decoder.labels  # both paths decode through it (the steady step and the others)

        def failing(encoded, slots, valid, *, static):
            if bad.n_chunks >= 3 and bad.slot in slots.tolist():
                raise RuntimeError("C's decoder failed")
            return labels(encoded, slots, valid, static=static)

        asr.decoder.labels = failing
    queues = {name: [pcm[i:i + 320] for i in range(0, pcm.size, 320)] for name, pcm in audio.items()}
    errors: dict[str, BaseException] = {}
    while any(queues[n] for n in audio if n not in errors):
        if where == "pre-encode" and bad.n_chunks >= 3 and bad.mel_cache is not None:
            bad.mel_cache = bad.mel_cache[:1]  # one mel band instead of all: C's own state is corrupt
        names = [n for n in audio if queues[n] and n not in errors]
        results = await asyncio.gather(*(streams[n].feed(queues[n].pop(0)) for n in names), return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                errors[name] = result
    assert list(errors) == ["C"] and bad.n_chunks == 3
    assert any(len(step) == 3 for step in log.steps)  # the failing chunk was in a batch of three
    for name in ("A", "B"):
        encoded = torch.cat(streams[name].state.encoded, dim=1)
        ref_encoded, ref_tokens = await alone(tiny_nemo, (70, 0), audio[name], list(audio).index(name))
        assert encoded.shape == ref_encoded.shape
        assert (encoded - ref_encoded).abs().max().item() < 1e-5, name
        assert log.of(streams[name]) == ref_tokens, name
    await asr.aclose()


async def test_a_capture_that_fails_leaves_the_asr_running_eagerly(tiny_nemo, jfk16):
    """If capturing the steady step fails at load (here: graphs asked for on a machine without CUDA),
    the ASR says so and runs the same step eagerly: a session still gets its transcript."""
    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(tiny_nemo, context=(70, 0), max_batch=2)
    asr.graphs.graphs_enabled = True  # as on a GPU: capture() now needs CUDA, which is not here
    lines: list[str] = []
    await asr.warm_up(lines.append)
    assert not asr.graphs.graphs_enabled and not asr.graphs.captured
    assert any("capture failed" in line and "running eagerly" in line for line in lines)
    log = TokenLog(asr)
    stream = asr.new_stream()
    await stream_all(stream, packets(jfk16[: 3 * 16000], seed=1))
    assert len(log.of(stream)) > 3
    await asr.aclose()
