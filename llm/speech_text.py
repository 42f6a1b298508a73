"""Reply text cleaned for speech, streaming: no markdown, no emoji, no line structure.

The system prompt asks for plain spoken sentences; this filter catches what slips through. It works
on whole words (a word is released when the whitespace after it arrives), so what it has emitted
never changes: list and heading markers at the start of a line are dropped, emphasis and code marks,
link targets and emoji are removed, line breaks become spaces (with a comma where a line ended
without punctuation, so list items do not run together).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MARKER = re.compile(r"#{1,6}|[-*+•–]|\d{1,3}[.)]|>+")
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\u2600-\u27BF\u2300-\u23FF\u2B00-\u2BFF\u2190-\u21FF"
    "\uFE0E\uFE0F\u200D\u20E3\U000E0020-\U000E007F]"
)
_LINK_TARGET = re.compile(r"\]\([^)\s]*\)")
_MARKS = re.compile(r"[*`#~\[\]|<>\x00-\x1f\x7f\ufffd]|^_+|_+$")
_WORDS = re.compile(r"(\s+)")


def clean_word(word: str) -> str:
    """One whitespace-free word without markdown marks or emoji."""
    word = _LINK_TARGET.sub("", word)
    word = _EMOJI.sub("", word)
    return _MARKS.sub("", word)


@dataclass
class SpeechText:
    """Feed raw reply text as it streams; get text fit to speak."""

    _pending: str = ""  # the last, possibly unfinished word
    _line_start: bool = True
    _space: bool = False  # whitespace seen since the last emitted word
    _emitted: bool = False

    def feed(self, piece: str) -> str:
        text = self._pending + piece
        parts = _WORDS.split(text)  # words at even indices, whitespace runs at odd ones
        self._pending = parts.pop()  # the text after the last whitespace: maybe more to come
        return self._emit(parts)

    def flush(self) -> str:
        """The rest, at the end of the reply."""
        rest, self._pending = self._pending, ""
        return self._emit([rest, ""]) if rest else ""

    def _emit(self, parts: list[str]) -> str:
        out: list[str] = []
        for i in range(0, len(parts), 2):
            word, gap = parts[i], parts[i + 1] if i + 1 < len(parts) else ""
            if word:
                if not (self._line_start and _MARKER.fullmatch(word)):
                    cleaned = clean_word(word)
                    if cleaned:
                        if "\n" in gap and cleaned[-1].isalnum():
                            cleaned += ","  # a line (list item, heading) ended without punctuation
                        out.append((" " if self._space and self._emitted else "") + cleaned)
                        self._emitted, self._space = True, False
                self._line_start = False
            if gap:
                self._space = True
                if "\n" in gap:
                    self._line_start = True
        return "".join(out)
