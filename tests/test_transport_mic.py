"""``duplex mic`` without a sound card: the session on a simulated room (a speaker whose sound comes
back into the microphone), on the virtual clock; and the clear message where there is no device."""

from __future__ import annotations

import asyncio
import importlib.abc
import json
import subprocess
import sys
import types
import wave

import numpy as np

from duplex import events as ev
from duplex.agent import Agent
from duplex.audio import resample
from duplex.clock import run_virtual
from duplex.config import AgentConfig
from duplex.fakes import FakeASR, FakeLLM, FakeTTS
from duplex.stages import Stages
from duplex.transport.mic import talk
from duplex.transport.room import room_response

REPLY = " ".join(f"word{i}" for i in range(16))  # 16 words of 0.35 s: 5.6 s of the agent talking


class SpeechTTS(FakeTTS):
    """The fake TTS, but every word is a slice of real speech, so its echo sounds like a person to
    the VAD (beeps would not, and the test could not fail)."""

    speech: np.ndarray = np.zeros(0, np.float32)
    _pos = 0

    def tone(self, word: str) -> np.ndarray:
        n = int(self.word_s * self.sample_rate)
        if self._pos + n > len(self.speech):
            self._pos = 0
        out = self.speech[self._pos:self._pos + n]
        self._pos += n
        return out.copy()


class SimulatedRoom:
    """A full-duplex sound card in a room: every 20 ms (loop clock) the callback gets the user's
    audio plus the echo of what the speaker played ``latency_s`` earlier (direct path and reverb)."""

    def __init__(self, user: np.ndarray, rate: int = 48_000, latency_s: float = 0.06, gain: float = 0.5) -> None:
        self.rate, self.block = rate, rate // 50
        self.latency_s, self.output_latency_s = latency_s, latency_s / 2
        self.user = user
        self.h = room_response(gain, delay_ms=5, rate=rate)
        self.played: list[np.ndarray] = []
        self._task: asyncio.Task | None = None

    def start(self, callback) -> None:
        self._task = asyncio.create_task(self._run(callback))

    async def _run(self, callback) -> None:
        loop = asyncio.get_running_loop()
        lag = int(self.latency_s * self.rate)
        echo = np.zeros(len(self.user) + lag + len(self.h) + 2 * self.block, np.float32)  # what comes back
        size = 1 << int(np.ceil(np.log2(self.block + len(self.h))))
        H = np.fft.rfft(self.h, size)
        t0, k = loop.time(), 0
        while True:
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - loop.time()))
            start = k * self.block
            mic = np.zeros(self.block, np.float32)
            user = self.user[start:start + self.block]
            mic[:len(user)] = user
            mic += echo[start:start + self.block] if start + self.block <= len(echo) else 0.0
            speaker = np.zeros(self.block, np.float32)
            callback(mic, speaker)
            self.played.append(speaker)
            # The speaker block reaches the microphone `lag` later, smeared by the room.
            out = np.fft.irfft(np.fft.rfft(speaker, size) * H, size)[:self.block + len(self.h) - 1]
            at = start + lag
            if at + len(out) <= len(echo):
                echo[at:at + len(out)] += out
            k += 1

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _agent(vad_model, jfk16: np.ndarray) -> Agent:
    tts = SpeechTTS(word_s=0.35)
    tts.speech = resample(jfk16, 16_000, 24_000)
    stages = Stages(vad=vad_model, asr=FakeASR(utterances=["hello there", "stop please"]),
                    llm=FakeLLM(replies=[REPLY], eot=0.9, ttft_s=0.1), tts=tts)
    return Agent(stages, AgentConfig(profile="fake"))


def _converse(vad_model, jfk16: np.ndarray, user: np.ndarray, guard: bool, record=None):
    agent = _agent(vad_model, jfk16)
    room = SimulatedRoom(resample(user, 16_000, 48_000))

    async def main():
        session = agent.session(record=record)
        events = session.events()
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(len(user) / 16_000, stop.set)
        link = await talk(session, room, guard=guard, stop=stop)
        return [e async for e in events], session.conversation.to_json(), link, session

    return run_virtual(main())


def test_agent_on_open_speakers_does_not_interrupt_itself(vad_model, jfk16):
    """The user speaks, the agent answers with 5.6 s of speech that comes back loud into the
    microphone. Without the echo guard the VAD takes that for the user and the agent interrupts
    itself; with it, no barge-in, and the whole reply is recorded as heard."""
    user = np.concatenate([jfk16[int(0.3 * 16_000):int(2.3 * 16_000)], np.zeros(9 * 16_000, np.float32)])
    events, record, link, session = _converse(vad_model, jfk16, user, guard=False)
    assert [e for e in events if isinstance(e, ev.BargeIn)]  # the control: echo alone barges in

    events, record, link, session = _converse(vad_model, jfk16, user, guard=True)
    assert not [e for e in events if isinstance(e, (ev.BargeIn, ev.Interrupted))]
    done, = [e for e in events if isinstance(e, ev.ReplyDone)]
    assert not done.interrupted and done.heard == REPLY
    assert [t["role"] for t in record["turns"]] == ["user", "assistant"]
    assert link.guard.stats.guarded > 200  # the reply really played through the speaker
    assert max(np.abs(b).max() for b in link.device.played) > 0.1
    assert link.underruns <= 2 and link.overflows == 0
    assert 0.03 <= session.output_latency_s <= 0.12  # the device's output latency plus the queue


def test_user_can_still_interrupt_through_the_guard(vad_model, jfk16, tmp_path):
    """The same room, but the user speaks again 1.5 s into the agent's reply: the barge-in goes
    through the guard, the reply is cut, and the record keeps only the words played before it. The
    recording (duplex mic --record) has the agent's voice in its right channel up to the barge-in and
    none after it (what the sound card gave back unheard is silence), and the words heard."""
    first, second = jfk16[int(0.3 * 16_000):int(2.3 * 16_000)], jfk16[int(5.4 * 16_000):int(7.7 * 16_000)]
    user = np.zeros(12 * 16_000, np.float32)
    user[:len(first)] = first
    user[int(4.6 * 16_000):int(4.6 * 16_000) + len(second)] = second  # the reply starts near 3.1 s
    events, record, link, session = _converse(vad_model, jfk16, user, guard=True, record=tmp_path)
    barge = [e for e in events if isinstance(e, ev.BargeIn)]
    interrupted = [e for e in events if isinstance(e, ev.Interrupted)]
    assert barge and interrupted
    assert abs(barge[0].speech_start / 16_000 - 4.6) < 0.35
    heard = interrupted[0].heard.split()
    assert 0 < len(heard) < len(REPLY.split())

    with wave.open(str(tmp_path / "audio.wav")) as w:
        rate = w.getframerate()
        agent_out = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)[:, 1] / 32767
    cut = barge[0].wall - session.t0
    assert np.abs(agent_out[int((cut - 1.0) * rate):int(cut * rate)]).max() > 0.05
    after = [e.wall - session.t0 for e in events if isinstance(e, ev.AudioOut)][1]  # the next reply
    assert np.abs(agent_out[int((cut + 0.06) * rate):int(after * rate)]).max() < 1e-3
    said = [t for t in json.loads((tmp_path / "transcript.json").read_text())["turns"] if t["role"] == "assistant"][0]
    assert [w["text"] for w in said["words"]] == heard and said["interrupted"]
    assert said["words"][-1]["end_s"] <= cut + 0.06


class _NoPortAudio(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import sounddevice`` fail as it does on a machine without PortAudio."""

    def find_spec(self, name, path, target=None):
        if name == "sounddevice":
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        raise OSError("PortAudio library not found")

    def exec_module(self, module):
        pass


def test_no_audio_device_gives_a_clear_message(monkeypatch, capsys):
    """Without PortAudio, or with PortAudio but no devices, `duplex mic` (with or without
    --list-devices) exits 2 with one line saying so and pointing to `duplex serve`; no traceback."""
    from duplex.cli import main

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    for argv in (["mic", "--list-devices"], ["mic", "--profile", "fake"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no audio device" in err and "PortAudio library not found" in err and "duplex serve" in err

    stub = types.SimpleNamespace(query_devices=lambda: [], default=types.SimpleNamespace(device=(-1, -1)))
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, _NoPortAudio)])
    monkeypatch.setitem(sys.modules, "sounddevice", stub)
    assert main(["mic", "--list-devices"]) == 2
    assert "no audio device found" in capsys.readouterr().err
    stub.query_devices = lambda: [{"name": "HDMI out", "max_input_channels": 0, "max_output_channels": 2,
                                   "default_samplerate": 48000.0}]
    assert main(["mic", "--profile", "fake"]) == 2
    assert "no microphone found" in capsys.readouterr().err


def test_mic_command_on_this_machine_fails_cleanly_or_lists():
    """`duplex mic --list-devices` here either lists devices or says there are none; never a traceback."""
    r = subprocess.run([sys.executable, "-m", "duplex.cli", "mic", "--list-devices"], capture_output=True,
                       text=True, timeout=60)
    assert "Traceback" not in r.stderr
    assert (r.returncode == 0 and "index" in r.stdout) or (r.returncode == 2 and "no audio device" in r.stderr)
