"""Text segmentation for speech and word timing, as pure functions."""

from __future__ import annotations

import random

import pytest

from duplex.tts.segmenter import Segmenter, SegmenterConfig
from duplex.tts.timing import WordTimer


def segment(text: str, size: int = 2, config: SegmenterConfig | None = None) -> list[str]:
    seg = Segmenter(config or SegmenterConfig())
    out: list[str] = []
    for i in range(0, len(text), size):
        out += seg.push(text[i:i + size])
    return out + seg.flush()


@pytest.mark.parametrize("text, first", [
    ("Yes. I can do that for you.", "Yes."),
    ("Well, I think so. Maybe not.", "Well, I think so."),  # a one-word clause is too short
    ("Sure thing, I can help with that today.", "Sure thing,"),
    ("I would be really very happy to help you with that.", "I would be really very"),
    ("Dr. Smith will see you now, he says.", "Dr. Smith will see you"),  # an abbreviation is no sentence end
])
def test_first_segment_comes_early(text, first):
    """The first segment ends at a sentence end, a clause end two or more words in, or after five words."""
    assert segment(text)[0] == first


def test_later_segments_end_at_sentences():
    """After the first, segments end at sentence ends (quotes and brackets included), not at commas."""
    text = 'Hello. This one, with a comma, is whole. "Quoted too!" (And this?) Last bit'
    assert segment(text) == ["Hello.", "This one, with a comma, is whole.", '"Quoted too!"', "(And this?)",
                             "Last bit"]


def test_long_sentences_are_cut():
    """A long sentence is cut at a clause end past clause_words, or hard at max_words."""
    config = SegmenterConfig(clause_words=4, max_words=6)
    words = " ".join(f"w{i}" for i in range(20))
    assert segment("Go. " + words, config=config)[1:] == [" ".join(f"w{i}" for i in range(j, min(j + 6, 20)))
                                                         for j in range(0, 20, 6)]
    assert segment("Go. a b c d e, f g h.", config=config)[1:] == ["a b c d e,", "f g h."]


def test_only_whole_words_are_released():
    """Nothing is released mid-word: a word counts once whitespace follows it (or the text ends)."""
    seg = Segmenter()
    assert seg.push("Hel") == [] and seg.push("lo.") == []  # "Hello." may still grow ("Hello.com")
    assert seg.push(" Wor") == ["Hello."]
    assert seg.push("ld") == [] and seg.flush() == ["World"]
    assert seg.flush() == []


def test_markup_is_not_spoken():
    """Markdown symbols are dropped; whitespace runs collapse."""
    assert segment("**Bold** and `code`\n\n# Title.") == ["Bold and code Title."]


@pytest.mark.parametrize("seed", range(20))
def test_word_timer_partitions_the_audio(seed):
    """Random segments, speaking rates, chunk sizes and early or late segment ends: the released spans
    cover the audio in order, contiguously, each released no earlier than the chunk its start falls in."""
    rng = random.Random(seed)
    frame = 1920
    timer = WordTimer(frame, frames_per_char=rng.uniform(0.3, 1.5))
    words_in: list[str] = []
    released = []
    offset = 0
    for _ in range(rng.randint(1, 4)):
        text = " ".join("x" * rng.randint(1, 9) for _ in range(rng.randint(1, 12)))
        words_in += text.split()
        timer.begin_segment(text, offset)
        frames = rng.randint(0, 60)  # 0: the model ended the segment at once
        chunk = rng.randint(1, 5)
        done_frames = 0
        while True:
            n = min(chunk, frames - done_frames)
            done_frames += n
            done = done_frames >= frames
            offset += n * frame
            for word in timer.advance(offset, done):
                assert word.start <= offset  # not announced before the chunk its audio starts in
                released.append(word)
            if done:
                break
    assert [w.text for w in released] == words_in
    assert released[0].start == 0 and released[-1].end == offset
    assert all(b.start == a.end for a, b in zip(released, released[1:]))
    assert all(w.end >= w.start for w in released)


def test_word_timer_refits_the_rate():
    """A segment that took twice the estimated frames doubles (roughly) the next estimate."""
    timer = WordTimer(1920, frames_per_char=0.5)
    text = "abcd " * 40
    timer.begin_segment(text, 0)
    chars = len(text.split()) * 5
    timer.advance(chars * 1920, segment_done=True)  # 1 frame per char, twice the estimate
    assert 0.8 < timer.frames_per_char <= 1.0
