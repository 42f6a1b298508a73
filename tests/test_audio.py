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
    """Resampling 20 ms blocks one by one equals resampling the whole signal (no edge clicks)."""
    x = jfk16[:16000]
    whole = resample(x, 16000, 48000)
    r = StreamResampler(16000, 48000)
    parts = [r(x[i:i + 320]) for i in range(0, len(x), 320)] + [r(np.zeros(0, np.float32), last=True)]
    streamed = np.concatenate(parts)
    n = min(len(whole), len(streamed)) - 200
    assert abs(len(streamed) - len(whole)) <= 2
    assert np.max(np.abs(streamed[200:n] - whole[200:n])) < 1e-3


def test_read_audio_errors(tmp_path):
    """A missing or non-audio file gets an error naming the file."""
    with pytest.raises(AudioFormatError, match="not found"):
        read_audio(tmp_path / "nope.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    with pytest.raises(AudioFormatError, match="cannot read"):
        read_audio(junk)
