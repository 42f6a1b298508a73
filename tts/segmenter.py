"""Cutting streamed reply text into segments to speak.

Text arrives in pieces as the LLM makes them (``" Hel"``, ``"lo,"`` ...). The codec LM speaks best
with whole phrases, yet the first audio should start as soon as possible, so:

- only whole words are released (a word is complete once whitespace follows it, or the text ends);
- the first segment ends at the first clause or sentence end, or after a few words, whichever comes
  first;
- later segments end at sentence ends (a long sentence is cut at a clause end, or hard at a limit).

:class:`Segmenter` is the pure, synchronous part; the TTS stream merges segments that queue up while
it speaks (longer segments read better) up to ``max_words``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*$")
CLAUSE_END = re.compile(r"([,;:]|--|—|–)[\"'”’)\]]*$")
ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "vs.", "etc.", "e.g.",
                           "i.e.", "approx.", "no.", "fig.", "mt.", "inc.", "ltd.", "co."})
UNSPOKEN = re.compile(r"[*#`_~<>|\\]+")  # markdown and markup symbols nobody reads aloud


def is_sentence_end(word: str) -> bool:
    if not SENTENCE_END.search(word):
        return False
    bare = word.lower().strip("\"'”’)]")
    if bare in ABBREVIATIONS:
        return False
    return not re.fullmatch(r"[A-Z]\.", word)  # an initial ("J.")


def is_clause_end(word: str) -> bool:
    return bool(CLAUSE_END.search(word))


@dataclass
class SegmenterConfig:
    first_min_words: int = 2  # a clause end this many words in may end the first segment
    first_max_words: int = 5  # the first segment ends after this many words regardless
    clause_words: int = 20  # past this, a later segment may end at a clause end
    max_words: int = 40  # hard cut


@dataclass
class Segmenter:
    """Feed text pieces with :meth:`push`; take segments as they complete; :meth:`flush` at the end."""

    config: SegmenterConfig = field(default_factory=SegmenterConfig)
    words: list[str] = field(default_factory=list)  # complete words not yet released
    partial: str = ""  # the word being typed
    segments: int = 0  # segments released so far

    def push(self, text: str) -> list[str]:
        text = UNSPOKEN.sub(" ", text)
        *complete, self.partial = re.split(r"\s+", self.partial + text)
        self.words.extend(w for w in complete if w)
        return self._cut()

    def flush(self) -> list[str]:
        """The text ended: release everything left."""
        out = self._cut()
        if self.partial:
            self.words.append(self.partial)
            self.partial = ""
        if self.words:
            out.append(self._take(len(self.words)))
        return out

    def _take(self, count: int) -> str:
        segment, self.words = " ".join(self.words[:count]), self.words[count:]
        self.segments += 1
        return segment

    def _cut(self) -> list[str]:
        out: list[str] = []
        c = self.config
        while True:
            count = (self._cut_point(c.first_min_words, c.first_max_words) if self.segments == 0
                     else self._cut_point(c.clause_words, c.max_words))
            if not count:
                return out
            out.append(self._take(count))

    def _cut_point(self, clause_words: int, max_words: int) -> int:
        """Words before the first cut: a sentence end, a clause end after ``clause_words`` words, or
        ``max_words`` words (0 while no cut is possible yet)."""
        for index, word in enumerate(self.words):
            n = index + 1
            if is_sentence_end(word) or (is_clause_end(word) and n >= clause_words) or n >= max_words:
                return n
        return 0
