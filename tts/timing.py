"""Word timing of a reply from its segments and frame counts.

A codec LM does not say where each word falls, so words are placed by estimate: within a segment,
each word's share of the audio is proportional to its length in characters (plus one for the gap),
at a speaking rate in frames per character that starts from the voice prompt (or a typical rate) and
is refit to every finished segment of the reply.

Spans are in samples of the reply audio and partition it: each word starts where the previous one
ended, the first at 0, and when the reply is done the last one ends at its last sample. A word is
released with the audio chunk its estimated start falls in, its end clamped to the audio made so
far; the last word of a segment waits for the segment's end (only then is its end known), and words
the estimate placed past an early end of the segment share what is left of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duplex.events import Word

TYPICAL_FRAMES_PER_CHAR = 0.8  # about 15 characters a second at 12.5 frames a second
PRIOR_CHARS = 40.0  # weight of the prior rate, in characters


@dataclass
class WordTimer:
    frame_size: int
    frames_per_char: float = TYPICAL_FRAMES_PER_CHAR
    cursor: int = 0  # end of the last released word (reply samples)
    _words: list[str] = field(default_factory=list)  # words of the current segment not yet released
    _bounds: list[float] = field(default_factory=list)  # estimated sample boundaries of the segment's words
    _start: int = 0  # first sample of the current segment
    _chars: int = 0  # weight of the current segment's words
    _seen_chars: float = PRIOR_CHARS
    _seen_frames: float = PRIOR_CHARS * TYPICAL_FRAMES_PER_CHAR

    def __post_init__(self) -> None:
        self._seen_frames = PRIOR_CHARS * self.frames_per_char

    def begin_segment(self, text: str, start: int) -> None:
        """A new segment's audio starts at reply sample ``start`` (where the previous one ended)."""
        if self._words:
            raise RuntimeError("begin_segment before the previous segment's words were released")
        self.cursor = start
        self._words = text.split()
        weights = [len(w) + 1 for w in self._words]
        scale = self.frames_per_char * self.frame_size
        bounds, total = [float(start)], float(start)
        for weight in weights:
            total += weight * scale
            bounds.append(total)
        self._bounds = bounds
        self._chars = sum(weights)
        self._start = start

    def advance(self, audio_end: int, segment_done: bool = False) -> list[Word]:
        """The reply's audio now reaches sample ``audio_end``: the words to release with this chunk."""
        out: list[Word] = []
        if segment_done:
            out.extend(self._finish(audio_end))
            return out
        while len(self._words) > 1:
            start_est, end_est = self._bounds[0], self._bounds[1]
            if max(start_est, self.cursor) >= audio_end:
                break
            end = max(self.cursor, min(int(round(end_est)), audio_end))
            out.append(Word(self._words.pop(0), self.cursor, end))
            self._bounds.pop(0)
            self.cursor = end
        return out

    def _finish(self, audio_end: int) -> list[Word]:
        out: list[Word] = []
        remaining = audio_end - self.cursor
        weights = [len(w) + 1 for w in self._words]
        total = sum(weights)
        acc = 0
        last = len(self._words) - 1
        for index, (word, weight) in enumerate(zip(self._words, weights)):
            acc += weight
            end = audio_end if index == last else self.cursor + (remaining * acc) // total
            start = out[-1].end if out else self.cursor
            out.append(Word(word, start, max(start, end)))
        frames = (audio_end - self._start) / self.frame_size
        if self._chars and frames > 0:  # refit the speaking rate to what the model actually did
            self._seen_chars += self._chars
            self._seen_frames += frames
            self.frames_per_char = self._seen_frames / self._seen_chars
        self._words, self._bounds = [], []
        self.cursor = audio_end
        return out
