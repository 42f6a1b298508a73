"""The live log-mel front end equals NeMo's offline preprocessor, frame for frame, whatever the packets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asr_fixtures import packets, tiny_nemo  # noqa: F401 (fixture)


def live_mel(spec, chunks) -> torch.Tensor:
    """Log-mel frames computed the way the worker does: each frame once its window has arrived."""
    from duplex.asr.frontend import AudioBuffer, frame_segment, log_mel

    audio, done, frames = AudioBuffer.empty(), 0, []
    for chunk in chunks:
        audio.append(chunk.astype(np.float32))
        ready = spec.frames_ready(audio.fed)
        if ready > done:
            seg = torch.from_numpy(frame_segment(spec, audio, done, ready))[None]
            frames.append(log_mel(spec, seg)[0])
            done = ready
            audio.drop_before(spec.first_sample(done) - 1)
    return torch.cat(frames, dim=1)


@pytest.mark.parametrize("low,high", [(160, 320), (1, 7), (1000, 5000)])
def test_live_mel_equals_offline_preprocessor(tiny_nemo, jfk16, low, high):
    """Packets of 10-20 ms, of a few samples, or of a third of a second all give the offline log-mel
    values for every frame whose window is complete (max abs diff < 1e-4 on values around -16..5)."""
    from duplex.asr.frontend import MelSpec

    spec = MelSpec.from_nemo(tiny_nemo.preprocessor)
    pcm = jfk16[: 3 * 16000]
    live = live_mel(spec, packets(pcm, seed=low, low=low, high=high))
    with torch.no_grad():
        offline, n = tiny_nemo.preprocessor(input_signal=torch.from_numpy(pcm)[None], length=torch.tensor([pcm.size]))
    assert live.shape[1] == spec.frames_ready(pcm.size) and live.shape[1] >= int(n) - 2
    diff = (offline[0, :, : live.shape[1]] - live).abs().max().item()
    assert diff < 1e-4, diff


def test_frame_readiness_is_tight(tiny_nemo, jfk16):
    """A frame declared ready depends on no later sample, and the next frame does: changing every
    sample from ``samples_needed(n)`` on leaves the offline frames before ``n`` unchanged and
    changes frame ``n``."""
    from duplex.asr.frontend import MelSpec

    spec = MelSpec.from_nemo(tiny_nemo.preprocessor)
    pcm = jfk16[16000:16000 + 8000].copy()
    n = 20
    cut = spec.samples_needed(n)
    assert spec.frames_ready(cut) == n and spec.frames_ready(cut - 1) == n - 1
    other = pcm.copy()
    other[cut:] = np.random.default_rng(0).uniform(-0.5, 0.5, pcm.size - cut).astype(np.float32)

    def mel(x):
        with torch.no_grad():
            return tiny_nemo.preprocessor(input_signal=torch.from_numpy(x)[None], length=torch.tensor([x.size]))[0][0]

    a, b = mel(pcm), mel(other)
    assert torch.equal(a[:, :n], b[:, :n])
    assert not torch.allclose(a[:, n], b[:, n])
