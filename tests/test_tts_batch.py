"""The TTS engine's batched frame step: every reply gets exactly the codes and audio it gets alone,
static shapes, and one reply's failure ends only that reply."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from duplex.tts.engine import Sampling, SegmentStart
from tts_fixtures import (collect, jfk24, make_engine, make_tts, one_torch_thread,  # noqa: F401
                          tiny_tts_checkpoint, voice_a)

# (text, frames per segment, the step it starts at, seed); replies joining and leaving at different times
PLAN = [("Hello there, how are you?", 9, 0, 1), ("A second voice speaks here.", 4, 0, 2),
        ("Third one joins later on.", 7, 3, 3), ("Short.", 3, 5, 4)]


def _run(engine, *, together: bool, voice=None):
    """Speak every reply of PLAN; returns per reply (codes [T, K], audio)."""
    replies = [engine.new_reply(voice if i % 2 else None, seed=seed, chunk_frames=2)
               for i, (_, _, _, seed) in enumerate(PLAN)]
    audio: list[list[np.ndarray]] = [[] for _ in PLAN]
    started = [False] * len(PLAN)
    done = [False] * len(PLAN)
    t = 0
    while not all(done):
        due = [i for i, (_, _, start, _) in enumerate(PLAN) if not started[i] and t >= start]
        if together:  # the segments starting at one step: one prefill pass
            starts = [SegmentStart(replies[i], PLAN[i][0], PLAN[i][1], stop_at_eos=False) for i in due]
            assert engine.begin_segments(starts) == [None] * len(due)
        for i in due:
            if not together:
                engine.begin_segment(replies[i], PLAN[i][0], PLAN[i][1], stop_at_eos=False)
            started[i] = True
        live = [i for i in range(len(PLAN)) if started[i] and not done[i]]
        groups = [live] if together else [[i] for i in live]
        for group in groups:
            if not group:
                continue
            for i, step in zip(group, engine.step_frames([replies[i] for i in group])):
                if step.pcm is not None:
                    audio[i].append(step.pcm)
                done[i] = step.done
        t += 1
    out = [(torch.stack(r.frames), np.concatenate(a)) for r, a in zip(replies, audio)]
    for r in replies:
        engine.release(r)
    return out


def test_batched_frames_equal_each_reply_alone(make_engine, voice_a, monkeypatch):
    """Replies with different prompts, voices and seeds, starting at different steps and ending after
    different numbers of frames, sampled (top-k at temperature 0.9): each one's codes are identical
    and its audio equal to 1e-5 to what it makes stepped alone. The two replies starting at the
    first step (one after a voice prompt, one not: their rows at other positions) begin their
    segments in one pass over both rows (the captured segment step)."""
    from duplex.tts.voice import check_voice

    engine = make_engine(sampling=Sampling())
    voice = engine.encode_voice(check_voice(voice_a), voice_a.text)
    alone = _run(engine, together=False, voice=voice)
    passes = []
    segment_pass = engine._segment_pass
    monkeypatch.setattr(engine, "_segment_pass", lambda runs: passes.append(len(runs)) or segment_pass(runs))
    together = _run(engine, together=True, voice=voice)
    assert passes == [2], passes
    for (codes_a, audio_a), (codes_b, audio_b), (_, frames, _, _) in zip(alone, together, PLAN):
        assert codes_a.shape == (frames, engine.num_codebooks)
        assert torch.equal(codes_a, codes_b)
        assert float(np.abs(audio_a - audio_b).max()) <= 1e-5 * max(1e-3, float(np.abs(audio_a).max()))
    assert not torch.equal(alone[0][0][:3], alone[2][0][:3])  # other seeds and texts say other things


def test_a_reply_alone_takes_the_captured_segment_pass_where_it_is_a_replay(make_engine, voice_a, monkeypatch):
    """Where the segment pass is a graph replay (a GPU with graphs; here its buckets are said to
    replay, so the pass runs the captured step's code eagerly), a reply starting its segment alone
    takes that pass, not an eager prefill of its own row, and speaks the same codes (audio to 1e-5)
    as with the eager prefill (what the CPU runs)."""
    from duplex.engine.graphs import BucketedStep
    from duplex.tts.voice import check_voice

    engine = make_engine(sampling=Sampling())
    voice = engine.encode_voice(check_voice(voice_a), voice_a.text)
    eager = _run(engine, together=False, voice=voice)
    passes, prefills = [], []
    segment_pass, prefill = engine._segment_pass, engine._prefill
    monkeypatch.setattr(engine, "_segment_pass", lambda runs: passes.append(len(runs)) or segment_pass(runs))
    monkeypatch.setattr(engine, "_prefill", lambda *run: prefills.append(run) or prefill(*run))
    monkeypatch.setattr(BucketedStep, "replays", property(lambda self: True))
    replayed = _run(engine, together=False, voice=voice)
    assert passes == [1] * len(PLAN) and not prefills, (passes, len(prefills))
    for (codes_a, audio_a), (codes_b, audio_b) in zip(eager, replayed):
        assert torch.equal(codes_a, codes_b)
        assert float(np.abs(audio_a - audio_b).max()) <= 1e-5 * max(1e-3, float(np.abs(audio_a).max()))


def test_a_voice_prompt_and_a_rebuilt_context_replay_in_pieces_where_the_pass_replays(make_engine, voice_a,
                                                                                        monkeypatch):
    """Where the segment pass is a graph replay (said so here, as above), the long prefills of one
    reply (a voice prompt's first use, a context rebuilt when a long reply runs out of positions)
    run as replays of the pass in pieces of at most its longest bucket, never as an eager prefill of
    the row, and the reply speaks the same codes (audio to 1e-5) as with the eager prefills."""
    from duplex.engine.graphs import BucketedStep
    from duplex.tts.engine import SEGMENT_LENGTHS, Voice
    from duplex.tts.voice import check_voice

    engine = make_engine(sampling=Sampling())
    # the voice prompt (98 embeddings) and three segments fill the row; each rebuilt context (the prompt
    # restored, then the newest segments, over 100 embeddings) is longer than the longest bucket
    engine.max_positions = 260
    encoded = engine.encode_voice(check_voice(voice_a), voice_a.text)

    def speak() -> tuple[torch.Tensor, np.ndarray, int]:
        reply = engine.new_reply(Voice(encoded.text, encoded.codes), seed=5, chunk_frames=5)
        audio = []
        for index in range(6):
            engine.begin_segment(reply, f"Sentence number {index} is said here.", 10, stop_at_eos=False)
            while not (step := engine.step(reply)).done:
                audio += [step.pcm] if step.pcm is not None else []
            audio += [step.pcm] if step.pcm is not None else []
        out = (torch.stack(reply.frames), np.concatenate(audio), reply.prefix_length)
        assert len(reply.history) < 6  # the context was rebuilt on the way
        engine.release(reply)
        return out

    eager = speak()
    assert eager[2] > SEGMENT_LENGTHS[-1]  # the voice prompt alone is longer than the longest bucket
    pieces, rows = [], []
    segment_pass, prefill = engine._segment_pass, engine.backbone.prefill
    monkeypatch.setattr(engine, "_segment_pass",
                        lambda runs: pieces.append(max(e.shape[0] for _, e in runs)) or segment_pass(runs))
    monkeypatch.setattr(engine.backbone, "prefill", lambda *args: rows.append(args) or prefill(*args))
    monkeypatch.setattr(BucketedStep, "replays", property(lambda self: True))
    replayed = speak()
    assert not rows, len(rows)  # no eager prefill of a row
    assert max(pieces) == SEGMENT_LENGTHS[-1] and pieces.count(SEGMENT_LENGTHS[-1]) >= 3, pieces  # cut in pieces
    assert replayed[2] == eager[2]
    assert torch.equal(replayed[0], eager[0])
    assert float(np.abs(replayed[1] - eager[1]).max()) <= 1e-5 * max(1e-3, float(np.abs(eager[1]).max()))


async def test_concurrent_streams_equal_streams_alone(make_tts):
    """Three sessions speaking at once through the scheduler (batched frame steps) make exactly the
    audio each makes alone. (Each text is one segment: how streamed text is cut into segments
    depends on timing, which is not what this compares.)"""
    tts = make_tts(chunk_frames=2, fixed_frames=6, seed=3)
    texts = ["Hello there my friend.", "The train leaves at nine.", "Yes."]
    alone = []
    for text in texts:
        stream = tts.new_stream()
        alone.append(np.concatenate([c.pcm for c in await collect(stream, [text])]))
    streams = [tts.new_stream() for _ in texts]
    before = tts.scheduler.ticks
    together = await asyncio.gather(*(collect(s, [t]) for s, t in zip(streams, texts)))
    assert max(tts.scheduler.batch_sizes(before)) == 3
    for a, chunks in zip(alone, together):
        b = np.concatenate([c.pcm for c in chunks])
        assert a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-5
    assert tts.engine.free_slots == tts.engine.slots  # every reply gave its row back


def test_every_frame_step_sees_the_same_shapes(make_engine):
    """The frame step of one reply runs on identical tensor shapes across segments and a context
    rebuild (a fixed attention length, whatever the row holds: here the shortest length bucket)."""
    engine = make_engine(slots=1)
    engine.max_positions = 90
    seen = []
    inner = engine.backbone.forward

    def spy(x, positions, kv, rows, write_rows, length, mask):
        if x.shape[1] == 1:  # a decode step (prefills have several positions)
            seen.append((tuple(x.shape), tuple(positions.shape), length, tuple(mask.shape)))
        return inner(x, positions, kv, rows, write_rows, length, mask)

    engine.backbone.forward = spy
    reply = engine.new_reply(None, seed=0, chunk_frames=4)
    for index in range(5):
        engine.begin_segment(reply, f"Sentence {index} here.", 8, stop_at_eos=False)
        while not engine.step(reply).done:
            pass
    assert len(reply.history) < 5  # the context was rebuilt on the way
    assert len(seen) == 40 and len(set(seen)) == 1, set(seen)
    engine.release(reply)


async def test_a_failing_reply_ends_alone(make_tts):
    """A reply whose frame fails inside a batched step (here: its row pointed past the pool) gets the
    error; the reply sharing its steps goes on and makes exactly its audio alone."""
    tts = make_tts(chunk_frames=2, fixed_frames=8, seed=5)
    ref = np.concatenate([c.pcm for c in await collect(tts.new_stream(), "Hello there.")])
    good, bad = tts.new_stream(), tts.new_stream()

    async def speak(stream, corrupt: bool):
        out = []
        async for chunk in stream.synthesize(_text("Hello there." if not corrupt else "Broken one.")):
            out.append(chunk.pcm)
            if corrupt:
                stream.last_reply.length = 10**6  # no such position: the step refuses this row
        return np.concatenate(out)

    results = await asyncio.gather(speak(good, False), speak(bad, True), return_exceptions=True)
    assert isinstance(results[1], RuntimeError) and "full" in str(results[1])
    assert results[0].shape == ref.shape and float(np.abs(results[0] - ref).max()) <= 1e-5
    await tts.scheduler.run(lambda: None)
    assert tts.engine.free_slots == tts.engine.slots


async def test_a_reply_stopped_while_its_row_is_taken_gives_the_row_back(make_tts):
    """A reply stopped (its task cancelled) while the engine is taking its row for it: the row comes
    back, so stopping replies under load never leaks a slot until every new reply is refused."""
    import threading

    tts = make_tts(chunk_frames=2, fixed_frames=4, seed=5)
    engine = tts.engine
    started, go = threading.Event(), threading.Event()
    take = engine.new_reply

    def slow_take(*args):  # the real job, held until the reply has been stopped
        started.set()
        go.wait(5)
        return take(*args)

    engine.new_reply = slow_take
    stream = tts.new_stream()

    async def speak():
        async for _ in stream.synthesize(_text("Hello there.")):
            pass

    task = asyncio.create_task(speak())
    assert await asyncio.to_thread(started.wait, 5)  # the job runs on the worker
    task.cancel()
    await asyncio.sleep(0)
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await tts.scheduler.run(lambda: None)  # after the row's give-back
    assert engine.free_slots == engine.slots
    engine.new_reply = take
    assert len(np.concatenate([c.pcm for c in await collect(tts.new_stream(), "Hello there.")])) > 0


async def _text(text: str):
    yield text


def test_all_rows_in_use_is_a_clear_error(make_engine):
    """More replies than rows: the next one is refused with a message naming the setting."""
    engine = make_engine(slots=1)
    reply = engine.new_reply(None, seed=0, chunk_frames=2)
    with pytest.raises(RuntimeError, match="engine-slots"):
        engine.new_reply(None, seed=0, chunk_frames=2)
    engine.release(reply)
    engine.release(engine.new_reply(None, seed=0, chunk_frames=2))
