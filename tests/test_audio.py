"""User audio is converted to 16 kHz mono float32 or refused with a clear message."""

import numpy as np
import pytest

from duplex.audio import StreamResampler, read_audio, resample, to_mono_float
from duplex.errors import AudioFormatError


def test_int16_and_float_give_the_same_signal():
    """int16 full scale maps to float [-1, 1]; int32 likewise."""
    x = np.array([0, 16384, -32768, 32767], np.int16)
    assert np.allclose(to_mono_float(x, 16000), [0, 0.5, -1.0, 32767 / 32768])
    assert np.allclose(to_mono_float(x.astype(np.int32) << 16, 16000), to_mono_float(x, 16000))


def test_stereo_is_downmixed_and_channels_first_is_caught():
    """[T, 2] is averaged; an obviously channels-first array gets an error naming the fix."""
    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.1)], axis=1).astype(np.float32)
    assert np.allclose(to_mono_float(stereo, 48000), 0.2)
    assert np.allclose(to_mono_float(stereo.T, 48000, channels_last=False), 0.2)
    with pytest.raises(AudioFormatError, match="channels-first"):
        to_mono_float(stereo.T, 48000)


def test_nan_inf_and_overrange_are_sanitised():
    """NaN/inf become silence and float beyond full scale is clipped (model state stays finite)."""
    x = np.array([np.nan, np.inf, -np.inf, 2.0, -3.0, 0.25], np.float32)
    assert to_mono_float(x, 16000).tolist() == [0, 0, 0, 1, -1, 0.25]


@pytest.mark.parametrize("bad, rate, message", [
    (np.zeros((2, 2, 2), np.float32), 16000, "1-D"),
    (np.zeros(10, np.complex64), 16000, "unsupported sample type"),
    (np.zeros(10, np.float32), 0, "positive integer"),
    (np.zeros(10, np.float32), 16000.5, "positive integer"),
])
def test_unusable_audio_is_refused(bad, rate, message):
    with pytest.raises(AudioFormatError, match=message):
        to_mono_float(bad, rate)


def test_streaming_resampler_matches_offline(jfk16):
    """Resampling 20 ms blocks one by one equals resampling the whole signal, ``delay`` samples
    later (no edge clicks), for every rate pair on the audio path and one soxr handles."""
    x = jfk16[:16000]
    for rate_in, rate_out in ((16000, 48000), (48000, 16000), (24000, 48000), (16000, 24000)):
        src = resample(x, 16000, rate_in)
        whole = resample(src, rate_in, rate_out)
        r = StreamResampler(rate_in, rate_out)
        block = rate_in // 50
        parts = [r(src[i:i + block]) for i in range(0, len(src), block)] + [r(np.zeros(0, np.float32), last=True)]
        streamed = np.concatenate(parts)[r.delay:]
        n = min(len(whole), len(streamed)) - 200
        assert abs(len(streamed) - len(whole)) <= 2, (rate_in, rate_out)
        assert np.max(np.abs(streamed[200:n] - whole[200:n])) < 1e-3, (rate_in, rate_out)


def test_streaming_resampler_adds_no_latency_between_the_paths_rates():
    """Between the rates of the audio path (integer ratios) each 20 ms block comes out whole, at
    once, and a signal comes out under 1 ms late: soxr's stream held back up to 38 ms and let it go
    in bursts, which a real-time path pads with silence (latency on every turn and barge-in)."""
    rng = np.random.default_rng(0)
    for rate_in, rate_out in ((16000, 48000), (48000, 16000), (24000, 48000)):
        r = StreamResampler(rate_in, rate_out)
        sizes = {len(r(rng.standard_normal(rate_in // 50).astype(np.float32) * 0.1)) for _ in range(50)}
        assert sizes == {rate_out // 50}, (rate_in, rate_out, sizes)
        assert r.delay <= rate_out // 1000
        impulse = np.zeros(rate_in // 10, np.float32)
        impulse[rate_in // 50] = 1.0  # 20 ms in
        out = StreamResampler(rate_in, rate_out)(impulse)
        assert int(np.argmax(np.abs(out))) == rate_out // 50 + r.delay


def test_read_audio_errors(tmp_path):
    """A missing or non-audio file gets an error naming the file."""
    with pytest.raises(AudioFormatError, match="not found"):
        read_audio(tmp_path / "nope.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    with pytest.raises(AudioFormatError, match="cannot read"):
        read_audio(junk)
