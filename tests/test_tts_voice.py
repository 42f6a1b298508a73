"""Voice prompts: they steer generation (a different clip, different codes; the same clip, the same
codes), they are set from the config and the API, and bad clips are refused with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from duplex.config import AgentConfig
from duplex.errors import AudioFormatError, ConfigError
from duplex.stages import VoicePrompt
from duplex.tts.voice import check_voice, load_voice
from tts_fixtures import (collect, jfk24, make_engine, make_tts, one_torch_thread,  # noqa: F401
                          tiny_tts_checkpoint, voice_a, voice_b)

TEXT = "Nice to meet you."


async def codes_in(tts, voice: VoicePrompt | None = None) -> torch.Tensor:
    stream = tts.new_stream()
    if voice is not None:
        await stream.set_voice(voice)
    chunks = await collect(stream, TEXT)
    assert chunks
    return stream.last_codes()


async def test_different_voice_changes_codes_same_voice_repeats(make_tts, voice_a, voice_b):
    """Same text and seed: voice A twice gives identical codes (control), voice B other codes, no voice
    other codes again: the prompt is what changed them."""
    tts = make_tts(fixed_frames=8)
    a1 = await codes_in(tts, voice_a)
    a2 = await codes_in(tts, voice_a)
    b = await codes_in(tts, voice_b)
    none = await codes_in(tts)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)
    assert not torch.equal(a1, none) and not torch.equal(b, none)


async def test_model_voice_from_config_and_api(make_tts, voice_a, voice_b, tmp_path):
    """The model's default voice (from build time, or set_voice later) is used by streams without their
    own; a stream's own voice overrides it; set_voice(None) returns to the default."""
    tts = make_tts(voice=voice_a, fixed_frames=6)
    with_a = await codes_in(tts)
    assert torch.equal(with_a, await codes_in(make_tts(fixed_frames=6), voice_a))
    stream = tts.new_stream()
    await stream.set_voice(voice_b)
    await collect(stream, TEXT)
    assert not torch.equal(stream.last_codes(), with_a)
    await stream.set_voice(None)
    stream.replies = 0
    await collect(stream, TEXT)
    assert torch.equal(stream.last_codes(), with_a)
    await tts.set_voice(None)
    assert not torch.equal(await codes_in(tts), with_a)


def test_build_tts_reads_the_voice_from_the_config(voice_a, tmp_path):
    """build_tts(config) with config.voice / config.voice_text loads and encodes the clip."""
    from duplex.tts.profiles import build_tts

    path = tmp_path / "voice.wav"
    sf.write(path, voice_a.pcm, voice_a.sample_rate)
    config = AgentConfig(profile="tiny", device="cpu", voice=str(path), voice_text=voice_a.text).validate()
    tts = build_tts(config, "cpu")
    try:
        assert tts.voice is not None and tts.voice.text == voice_a.text
        assert tts.voice.frames == int(np.ceil(len(voice_a.pcm) / 1920))
    finally:
        tts.close()


def test_loads_and_resamples_a_clip_file(jfk_path):
    """A 44.1 kHz stereo FLAC cut to 3 s loads as 24 kHz mono."""
    prompt = load_voice(jfk_path, "And so my fellow Americans, ask not what your country can do for you")
    assert prompt.sample_rate == 44_100
    with pytest.raises(AudioFormatError, match="at most 20 s"):  # the whole file is 11 s: fine ...
        check_voice(VoicePrompt(np.tile(prompt.pcm, 2), prompt.sample_rate, prompt.text))  # ... 22 s is not
    pcm = check_voice(VoicePrompt(prompt.pcm[: 3 * 44_100], 44_100, prompt.text))
    assert pcm.dtype == np.float32 and pcm.shape == (3 * 24_000,)


@pytest.mark.parametrize("pcm, rate, text, error, message", [
    (np.zeros(24_000, np.float32), 24_000, "hi", AudioFormatError, "1.00 s long; a voice prompt needs 2"),
    (np.full(25 * 24_000, 0.1, np.float32), 24_000, "hi", AudioFormatError, "25.0 s long; .* at most 20 s"),
    (np.zeros(3 * 24_000, np.float32), 24_000, "hi", AudioFormatError, "silent"),
    (np.full(3 * 16_000, 1e-4, np.float32), 16_000, "hi", AudioFormatError, "silent"),
    (np.full(3 * 24_000, 0.1, np.float32), 24_000, "   ", ConfigError, "transcript"),
    (np.full(3 * 24_000, 0.1, np.complex64), 24_000, "hi", AudioFormatError, "unsupported sample type"),
    (np.full(3 * 24_000, 0.1, np.float32), 0, "hi", AudioFormatError, "sample_rate"),
    (np.zeros(0, np.float32), 24_000, "hi", AudioFormatError, "no audio"),
])
def test_bad_clips_are_refused(pcm, rate, text, error, message):
    """Too short, too long, silent, no transcript, wrong sample type or rate, empty: a clear error each."""
    with pytest.raises(error, match=message):
        check_voice(VoicePrompt(pcm, rate, text))


def test_bad_files_are_refused(tmp_path):
    """A file that is not audio, or is missing, is refused naming the file."""
    bogus = tmp_path / "voice.wav"
    bogus.write_text("not audio at all")
    with pytest.raises(AudioFormatError, match="cannot read .*voice.wav as audio"):
        load_voice(bogus, "hello")
    with pytest.raises(AudioFormatError, match="not found"):
        load_voice(tmp_path / "missing.wav", "hello")


async def test_stream_keeps_its_first_voice(make_tts):
    """With no voice prompt anywhere, a stream's first finished segment becomes the prompt of its later
    replies (the voice stays the same across replies); with keep_first_voice=False it does not."""
    tts = make_tts(fixed_frames=20)
    stream = tts.new_stream()
    await collect(stream, "Hello there.")
    assert stream.voice is not None and stream.voice.text == "Hello there."
    assert torch.equal(stream.voice.codes.cpu(), stream.last_codes())
    await collect(stream, "Second reply.")
    kept = stream.last_codes()
    plain = make_tts(fixed_frames=20, keep_first_voice=False).new_stream()
    await collect(plain, "Hello there.")
    assert plain.voice is None
    await collect(plain, "Second reply.")
    assert not torch.equal(plain.last_codes(), kept)
