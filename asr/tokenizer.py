"""SentencePiece vocabularies trained locally, for the tiny and random-weight ASR models.

Nothing is downloaded: the training text is generated here (common English words plus pseudo-words
made of syllables, from a fixed seed), so the same vocabulary comes out on every machine. The
directory written is what NeMo's BPE models expect (``tokenizer.model``, ``tokenizer.vocab``,
``vocab.txt``).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

_WORDS = (
    "and so my fellow americans ask not what your country can do for you ask what you can do for "
    "the of to in is it that was he for on are with as his they be at one have this from or had by "
    "hot word but some we can out other were all there when up use your how said an each she which "
    "do their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know water "
    "than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form sentence great think say help low line differ turn cause much mean before "
    "move right boy old too same tell does set three want air well also play small end put home read "
    "hand port large spell add even land here must big high such follow act why ask men change went "
    "light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant "
    "hello thanks yes okay sure please sorry weather today tomorrow music agent listen speak stop"
).split()
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "y", "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "sk", "st", "str", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "st", "nd", "rt")


def training_text(n_sentences: int, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences (real words mixed with pseudo-words)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = []
        for _ in range(rng.randint(4, 14)):
            if rng.random() < 0.6:
                words.append(rng.choice(_WORDS))
            else:
                words.append("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                                     for _ in range(rng.randint(1, 3))))
        sentences.append(" ".join(words))
    return sentences


def build_sentencepiece(out_dir: Path, vocab_size: int, *, user_symbols: tuple[str, ...] = (),
                        n_sentences: int = 4000) -> Path:
    """Train a unigram SentencePiece model into ``out_dir`` (atomically; reused if already there)."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.model").is_file() and (out_dir / "vocab.txt").is_file():
        return out_dir
    import sentencepiece as spm

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".spm-", dir=out_dir.parent))
    try:
        corpus = work / "text.txt"
        corpus.write_text("\n".join(training_text(n_sentences)) + "\n", encoding="utf-8")
        spm_dir = work / "spm"
        spm_dir.mkdir()
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(spm_dir / "tokenizer"), vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1, hard_vocab_limit=False,
            remove_extra_whitespaces=False, user_defined_symbols=list(user_symbols), minloglevel=2)
        # vocab.txt as NeMo writes it: word-initial pieces bare, continuations with "##"
        special = {"<s>", "</s>", "<pad>", "<unk>", *user_symbols}
        pieces = [line.split("\t")[0] for line in
                  (spm_dir / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()]
        vocab = [(p[1:] or p[0]) if p.startswith("\u2581") else f"##{p}" for p in pieces if p not in special]
        (spm_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        try:
            os.replace(spm_dir, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "tokenizer.model").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir
