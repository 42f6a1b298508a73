"""The words of the utterance being recognised, and the partial / final events made from them.

Greedy streaming decoding never takes a token back, so every word before the last is final the
moment the next word starts: that is the *stable* prefix, which never changes. The last word may
still grow (more sub-word pieces), so it is the *unstable* tail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from duplex.events import TranscriptFinal, TranscriptPartial, Word
from duplex.asr.vocab import Vocabulary, words_of


@dataclass(frozen=True)
class FrameTiming:
    """Maps encoder frames to input samples: frame ``j`` is new audio up to mel frame ``factor*j``."""

    factor: int  # mel frames per encoder frame
    hop: int  # input samples per mel frame

    def start(self, frame: int) -> int:
        return max(0, ((frame - 1) * self.factor + 1) * self.hop)

    def end(self, frame: int) -> int:
        return (frame * self.factor + 1) * self.hop


@dataclass
class Utterance:
    """Tokens of the current utterance as ``(encoder frame since stream start, token id)``."""

    tokens: list[tuple[int, int]] = field(default_factory=list)
    shown: tuple[str, str] = ("", "")  # (stable, unstable) of the last partial sent

    def words(self, vocab: Vocabulary, timing: FrameTiming) -> tuple[list[Word], bool]:
        """The words with their sample spans, and whether the last one is complete."""
        spans = words_of(vocab, self.tokens)
        complete = bool(spans) and spans[-1].text == ""
        words = [Word(w.text, timing.start(w.first), timing.end(w.last)) for w in spans if w.text]
        return words, complete

    def partial(self, vocab: Vocabulary, timing: FrameTiming, *, stream_samples: int,
                wall: float) -> TranscriptPartial | None:
        """A partial if the text changed since the last one."""
        words, complete = self.words(vocab, timing)
        texts = [w.text for w in words]
        if complete or not texts:
            stable, unstable = " ".join(texts), ""
        else:
            stable, unstable = " ".join(texts[:-1]), texts[-1]
        if (stable, unstable) == self.shown:
            return None
        self.shown = (stable, unstable)
        return TranscriptPartial(stream_samples=stream_samples, wall=wall, stable=stable, unstable=unstable,
                                 words=tuple(words))

    def final(self, vocab: Vocabulary, timing: FrameTiming, *, stream_samples: int, wall: float,
              eou: bool = False) -> TranscriptFinal | None:
        """The final of this utterance (None without words); the utterance is then empty. ``eou``: the
        model itself ended it (an end-of-utterance token)."""
        words, _ = self.words(vocab, timing)
        self.tokens, self.shown = [], ("", "")
        if not words:
            return None
        return TranscriptFinal(stream_samples=stream_samples, wall=wall, text=" ".join(w.text for w in words),
                               words=tuple(words), eou=eou)
