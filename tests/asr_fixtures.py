"""Tiny streaming ASR models and helpers for the ASR tests.

The tiny models are built once per cache (``DUPLEX_CACHE``, see conftest) by
:mod:`duplex.asr.synthetic`, and loaded here through :func:`duplex.asr.loading.load_nemo`, the
loader real checkpoints go through, once per test run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

CONTEXTS = [(70, 0), (70, 1), (70, 6), (70, 13)]


def _load(variant: str):
    import torch

    from duplex.asr.loading import load_nemo
    from duplex.asr.synthetic import tiny_model_path

    torch.set_num_threads(1)  # tiny models: OpenMP spinning on the shared CPU only slows them down
    return load_nemo(str(tiny_model_path(variant)))


@pytest.fixture(scope="session")
def tiny_nemo():
    """The tiny hybrid RNNT+CTC FastConformer (SentencePiece vocabulary), as NeMo loads it."""
    return _load("tiny")


@pytest.fixture(scope="session")
def tiny_eou_nemo():
    """The tiny RNNT FastConformer whose vocabulary has <EOU> and <EOB>."""
    return _load("tiny-eou")


def offline_encoder(model, pcm: np.ndarray, context: tuple[int, int]):
    """NeMo's offline path on the whole signal: log-mel [n_mels, T] and encoder output [D, T']."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(pcm)[None]
        mel, n = model.preprocessor(input_signal=x, length=torch.tensor([pcm.size]))
        model.encoder.set_default_att_context_size(list(context))
        enc, _ = model.encoder(audio_signal=mel, length=n)
    return mel[0, :, : int(n)], enc[0]


def offline_rnnt_tokens(model, encoded) -> list[int]:
    """NeMo's own greedy RNNT decoding of encoder output [D, T]."""
    import torch

    with torch.no_grad():
        hyp = model.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded[None], encoded_lengths=torch.tensor([encoded.size(1)]), return_hypotheses=True)[0]
    return [int(t) for t in hyp.y_sequence]


def offline_ctc_tokens(model, encoded) -> list[int]:
    """NeMo's greedy CTC decoding of encoder output [D, T] (repeats collapsed, blanks dropped)."""
    import torch

    with torch.no_grad():
        log_probs = model.ctc_decoder(encoder_output=encoded[None])
        hyp = model.ctc_decoding.ctc_decoder_predictions_tensor(
            log_probs, decoder_lengths=torch.tensor([encoded.size(1)]), return_hypotheses=True)[0]
    blank = model.tokenizer.vocab_size
    out, prev = [], blank
    for k in (int(t) for t in hyp.y_sequence):  # NeMo keeps the per-frame argmax here
        if k != blank and k != prev:
            out.append(k)
        prev = k
    return out


def packets(pcm: np.ndarray, seed: int, low: int = 160, high: int = 320) -> list[np.ndarray]:
    """``pcm`` cut into random packets of ``low``..``high`` samples (10-20 ms by default)."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < pcm.size:
        n = int(rng.integers(low, high + 1))
        out.append(pcm[i:i + n])
        i += n
    return out


class TokenLog:
    """Records the tokens a StreamingASR returns, per session, from its steps and its endpoint flushes."""

    def __init__(self, asr) -> None:
        self.tokens: dict[int, list[tuple[str, int, int]]] = {}  # id(state) -> [(step|flush, frame, token)]
        self.steps: list[list[int]] = []  # per step: n_chunks of each session before it
        step_inner, flush_inner = asr._batch._step, asr._flush

        def step(states):
            self.steps.append([s.n_chunks for s in states])
            results = step_inner(states)
            for s, r in zip(states, results):
                self.tokens.setdefault(id(s), []).extend(("step", f, k) for f, k in r.tokens)
            return results

        def flush(state):
            result = flush_inner(state)
            self.tokens.setdefault(id(state), []).extend(("flush", f, k) for f, k in result.tokens)
            return result

        asr._batch._step, asr._flush = step, flush

    def of(self, stream, flushed: bool = False) -> list[int]:
        """Tokens of ``stream``'s chunk steps (and of its flushes too with ``flushed``), in order."""
        return [k for kind, _, k in self.tokens.get(id(stream.state), []) if flushed or kind == "step"]

    def frames(self, stream) -> list[int]:
        """Encoder frames at which ``stream``'s tokens were emitted (steps and flushes)."""
        return [f for _, f, _ in self.tokens.get(id(stream.state), [])]


async def stream_all(stream, chunks: Sequence[np.ndarray]) -> list:
    events = []
    for chunk in chunks:
        events.extend(await stream.feed(chunk))
    return events
