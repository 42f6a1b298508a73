"""Sound cards for ``duplex mic``: finding sounddevice/PortAudio, listing and picking devices, and
the duplex audio stream itself, with a clear error where there is no audio device (as on a server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from duplex.errors import UserError

NO_DEVICE_HINT = ("on a machine without a sound card (a server, a container), run `duplex serve` and talk "
                  "from a browser instead")


class NoAudioDevice(UserError):
    """No usable microphone or speaker here."""


def sounddevice() -> Any:
    """The sounddevice module, or :class:`NoAudioDevice` saying what to install."""
    try:
        import sounddevice as sd
    except ImportError:
        raise NoAudioDevice("duplex mic needs the sounddevice package: pip install sounddevice "
                            "(or pip install -e '.[mic]')") from None
    except OSError as exc:  # the package is there, the PortAudio library is not
        raise NoAudioDevice(f"no audio device: {exc} (install it: apt-get install libportaudio2, or "
                            f"brew install portaudio); {NO_DEVICE_HINT}") from None
    return sd


def _devices(sd: Any) -> list[dict[str, Any]]:
    try:
        return [dict(d) for d in sd.query_devices()]
    except Exception as exc:  # PortAudio errors on hosts without audio
        raise NoAudioDevice(f"no audio device: PortAudio cannot list devices ({exc}); {NO_DEVICE_HINT}") from None


def describe_devices() -> str:
    """A listing of the audio devices (``duplex mic --list-devices``)."""
    sd = sounddevice()
    devices = _devices(sd)
    if not devices:
        raise NoAudioDevice(f"no audio device found; {NO_DEVICE_HINT}")
    try:
        default_in, default_out = sd.default.device
    except Exception:
        default_in = default_out = -1
    lines = ["index  in  out  rate    name"]
    for i, d in enumerate(devices):
        mark = (" <in" if i == default_in else "") + (" <out" if i == default_out else "")
        lines.append(f"{i:5d}  {d['max_input_channels']:2d}  {d['max_output_channels']:3d}  "
                     f"{int(d['default_samplerate']):6d}  {d['name']}{mark}")
    lines.append("pick with --input-device / --output-device (index or part of the name)")
    return "\n".join(lines)


def _pick(devices: list[dict[str, Any]], wanted: str | None, kind: str, default: int) -> int:
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    usable = [i for i, d in enumerate(devices) if d[key] > 0]
    if not usable:
        raise NoAudioDevice(f"no {'microphone' if kind == 'input' else 'speaker'} found; {NO_DEVICE_HINT}")
    if wanted is None:
        return default if default in usable else usable[0]
    if wanted.strip().isdigit():
        index = int(wanted)
        if index not in usable:
            raise NoAudioDevice(f"--{kind}-device {index} is not an {kind} device; see duplex mic --list-devices")
        return index
    matches = [i for i in usable if wanted.lower() in devices[i]["name"].lower()]
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)}"
        raise NoAudioDevice(f"--{kind}-device {wanted!r} matches {found} {kind} devices; give an index "
                            "from duplex mic --list-devices")
    return matches[0]


def pick_devices(input_device: str | None, output_device: str | None) -> tuple[int, int]:
    """Device indices for the microphone and the speaker (defaults when not given)."""
    sd = sounddevice()
    devices = _devices(sd)
    try:
        default_in, default_out = (int(x) for x in sd.default.device)
    except Exception:
        default_in = default_out = -1
    return _pick(devices, input_device, "input", default_in), _pick(devices, output_device, "output", default_out)


class SoundDeviceAudio:
    """A full-duplex PortAudio stream: one callback per ``block`` gets the microphone block and fills
    the speaker block (see :class:`duplex.transport.mic.AudioDevice`)."""

    def __init__(self, input_device: int, output_device: int, rate: int = 48_000) -> None:
        self.sd = sounddevice()
        self.devices = (input_device, output_device)
        try:
            self.sd.check_input_settings(device=input_device, channels=1, samplerate=rate, dtype="float32")
            self.sd.check_output_settings(device=output_device, channels=1, samplerate=rate, dtype="float32")
        except Exception:
            rate = int(self.sd.query_devices(input_device)["default_samplerate"])
        self.rate = rate
        self.block = rate // 50
        self.stream: Any = None
        self.latency_s = 0.0  # output to input: how long after being written a sample is heard back
        self.output_latency_s = 0.0

    def start(self, callback: Callable[[np.ndarray, np.ndarray], None]) -> None:
        def on_block(indata, outdata, frames, time, status) -> None:  # PortAudio's thread
            out = np.zeros(frames, np.float32)
            callback(indata[:, 0].copy(), out)
            outdata[:] = out[:, None]

        try:
            self.stream = self.sd.Stream(device=self.devices, samplerate=self.rate, blocksize=self.block,
                                         channels=(1, 1), dtype="float32", latency="low", callback=on_block)
            in_latency, out_latency = self.stream.latency  # known once open, before the first callback
            self.latency_s, self.output_latency_s = in_latency + out_latency, out_latency
            self.stream.start()
        except Exception as exc:
            raise NoAudioDevice(f"cannot open the audio devices {self.devices}: {exc}; see "
                                "duplex mic --list-devices") from None

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.stop()
            self.stream.close()
            self.stream = None
