"""Token ids to words: the model's vocabulary as pieces that start or continue a word.

SentencePiece pieces starting with ``▁`` start a word; character vocabularies start a word after a
space. Pieces such as ``<unk>`` carry no text, and ``<EOU>`` / ``<EOB>`` mark the end of an
utterance (the parakeet realtime EOU models emit them).
"""

from __future__ import annotations

from dataclasses import dataclass

SPM_SPACE = "\u2581"
END_OF_UTTERANCE = ("<EOU>", "<EOB>")


@dataclass(frozen=True)
class Vocabulary:
    texts: tuple[str, ...]  # text each token adds to its word
    starts: tuple[bool, ...]  # whether the token starts a new word
    end_ids: frozenset[int]  # end-of-utterance tokens

    @classmethod
    def from_pieces(cls, pieces: list[str]) -> Vocabulary:
        texts, starts, ends = [], [], set()
        for i, piece in enumerate(pieces):
            special = len(piece) > 2 and piece.startswith("<") and piece.endswith(">")
            if piece in END_OF_UTTERANCE:
                ends.add(i)
            texts.append("" if special or piece == " " else piece.replace(SPM_SPACE, ""))
            starts.append(piece.startswith(SPM_SPACE) or piece == " ")
        return cls(tuple(texts), tuple(starts), frozenset(ends))

    @classmethod
    def from_nemo(cls, model) -> Vocabulary:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            pieces = [tokenizer.ids_to_tokens([i])[0] for i in range(tokenizer.vocab_size)]
        else:  # character models
            labels = getattr(model.decoder, "vocabulary", None) or list(model.cfg.labels)
            pieces = [str(p) for p in labels]
        return cls.from_pieces(pieces)


@dataclass(frozen=True)
class WordSpan:
    text: str
    first: int  # frame of its first token
    last: int  # frame of its last token


def words_of(vocab: Vocabulary, tokens: list[tuple[int, int]]) -> list[WordSpan]:
    """Group ``(frame, token)`` pairs into words; the last word may be empty (a word just started)."""
    words: list[list] = []
    for frame, token in tokens:
        if token in vocab.end_ids or token >= len(vocab.texts):
            continue
        text = vocab.texts[token]
        if vocab.starts[token] or not words:
            words.append([text, frame, frame])
        else:
            words[-1][0] += text
            words[-1][2] = frame
    # empty words in the middle (a lone "▁" followed by another word start) carry nothing
    spans = [WordSpan(t, a, b) for t, a, b in words]
    return [w for i, w in enumerate(spans) if w.text or i == len(spans) - 1]
