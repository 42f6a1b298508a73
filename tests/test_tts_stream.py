"""The TTS stage end to end on the tiny model: seamless chunked audio across segments, word timings,
cancellation within one frame with the model left reusable, and the text source read concurrently."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
import torch

from duplex.stages import TTSStream
from tts_fixtures import (collect, make_engine, make_tts, one_torch_thread, pieces,  # noqa: F401
                          relative_error, tiny_tts_checkpoint)

REPLY = "Well, hello there. This is the second sentence of the reply! And a third one?"
SHORT = dict(min_seconds=0.2, seconds_per_char=0.04)  # caps the babbling tiny model's segments


def check_word_spans(chunks, text: str) -> None:
    """Spans partition the reply audio in order, and no word is announced before its chunk."""
    words = [w for c in chunks for w in c.words]
    assert [w.text for w in words] == text.split()
    total = sum(len(c.pcm) for c in chunks)
    assert words[0].start == 0 and words[-1].end == total
    for prev, word in zip(words, words[1:]):
        assert word.start == prev.end  # contiguous, hence monotonic
    assert all(w.end >= w.start for w in words)
    offset = 0
    for chunk in chunks:
        for word in chunk.words:
            assert word.start <= offset + len(chunk.pcm)  # its audio has begun by the end of this chunk
        offset += len(chunk.pcm)


@pytest.mark.parametrize("chunk_frames", [1, 3])
async def test_reply_audio_is_seamless_and_words_cover_it(make_tts, tiny_tts_checkpoint, chunk_frames):
    """A two-segment reply streamed in chunks equals one-shot decoding of all its frames (one decoder
    state across segment joins), each chunk holds chunk_frames frames (a segment's last may hold fewer),
    and the word spans are monotonic, contiguous and cover the emitted audio."""
    tts = make_tts(chunk_frames=chunk_frames, **SHORT)
    stream = tts.new_stream()
    assert isinstance(stream, TTSStream) and stream.sample_rate == 24_000
    chunks = await collect(stream, REPLY)
    frame = tts.engine.frame_size
    assert all(len(c.pcm) <= chunk_frames * frame and len(c.pcm) % frame == 0 for c in chunks)
    codes = stream.last_codes()  # [T, K]
    audio = np.concatenate([c.pcm for c in chunks])
    assert len(audio) == codes.shape[0] * frame
    # the first sentence alone (said while the rest streamed in), then the two queued ones merged
    assert [len(s.ids) for s in stream.last_reply.history] == [len(tts.engine.text_ids(t)) for t in
                                                               ("Well, hello there.", REPLY[19:])]
    one_shot = tiny_tts_checkpoint[0].codec_model.decode(codes.T[None]).audio_values[0, 0].clamp(-1, 1)
    assert relative_error(torch.from_numpy(audio), one_shot) < 1e-5
    check_word_spans(chunks, REPLY)


async def test_cancel_mid_reply_stops_within_one_frame(make_tts):
    """Cancelling the consumer while a frame is being launched (run ahead): that frame finishes, no
    other frame is started, and the next reply on the same model is what a fresh model says for the
    same seed."""
    tts = make_tts(chunk_frames=1, fixed_frames=40)
    engine = tts.engine
    reached, release = threading.Event(), threading.Event()
    stop_at = 5

    def hook(count: int) -> None:
        if count == stop_at:
            reached.set()
            release.wait(10)

    engine.on_frame = hook
    stream = tts.new_stream()
    got: list = []

    async def consume():
        async for chunk in stream.synthesize(pieces("One two three four five six seven.")):
            got.append(chunk)

    task = asyncio.create_task(consume())
    assert await asyncio.to_thread(reached.wait, 10)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await tts.scheduler.run(lambda: None)  # everything queued on the worker has run
    # the frame being launched when the reader left (the one run ahead) lands, and no other starts; the
    # reader had every frame but the one its last tick made (held back by the hook)
    assert engine.frames_generated == stop_at + 1
    assert len(got) == stop_at - 1
    await tts.scheduler.run(lambda: None)
    assert engine.frames_generated == stop_at + 1
    engine.on_frame = None

    # reusable: the next reply equals a fresh model's first reply (same seed, same text)
    stream.replies = 0
    again = await collect(stream, "Reusable now.")
    fresh = await collect(make_tts(chunk_frames=1, fixed_frames=40).new_stream(), "Reusable now.")
    assert len(again) == len(fresh) > 0
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(again, fresh))


async def test_closing_the_iterator_stops_generation(make_tts):
    """Closing the iterator after the first chunk (what a barge-in does) makes no further frame than the
    one already run ahead, and the text source is released."""
    tts = make_tts(chunk_frames=2, fixed_frames=30)
    engine = tts.engine
    closed = asyncio.Event()

    async def text():
        try:
            yield "Hello there, a long reply follows."
            await asyncio.sleep(3600)  # the LLM is still thinking
            yield " never"
        finally:
            closed.set()

    stream = tts.new_stream()
    async with contextlib.aclosing(stream.synthesize(text())) as audio:
        async for _chunk in audio:
            break
    made = engine.frames_generated
    await tts.scheduler.run(lambda: None)
    # the chunk's two frames, then the one run ahead while the reader took them; no other
    assert made <= 3 and engine.frames_generated == 3
    await tts.scheduler.run(lambda: None)
    assert engine.frames_generated == 3
    assert closed.is_set()


async def test_text_is_read_while_speaking(make_tts):
    """The text source is drained while the first segment is still being spoken, so the LLM is never
    held back by the TTS; the later text is spoken after it."""
    tts = make_tts(chunk_frames=1, **SHORT)
    pulled_at: list[int] = []
    engine = tts.engine

    async def text():
        for piece in ["Hi there, ", "how ", "are ", "you ", "doing ", "today?"]:
            pulled_at.append(engine.frames_generated)
            yield piece
            await asyncio.sleep(0)

    stream = tts.new_stream()
    chunks = [c async for c in stream.synthesize(text())]
    assert pulled_at[-1] < len(stream.last_reply.history[0].frames)  # all text in before segment 1 ended
    assert [w.text for c in chunks for w in c.words] == "Hi there, how are you doing today?".split()


async def test_text_source_errors_reach_the_consumer(make_tts):
    """A failing text source (the LLM crashed) ends the reply with its error, not a hang."""
    tts = make_tts(**SHORT)

    async def text():
        yield "Hello there, friend. "
        raise RuntimeError("llm failed")

    stream = tts.new_stream()
    with pytest.raises(RuntimeError, match="llm failed"):
        async for _chunk in stream.synthesize(text()):
            pass


async def test_empty_text_makes_no_audio(make_tts):
    """Whitespace-only text: no chunks, no frames."""
    tts = make_tts()
    assert await collect(tts.new_stream(), "   \n ") == []
    assert tts.engine.frames_generated == 0
