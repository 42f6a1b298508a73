"""``duplex doctor``: check this machine for what duplex needs, one verdict and one fix per line.

Checks Python and every package against the versions the code needs, which extras are installed and
what they enable, torch's devices (CUDA, MPS, CPU; bf16), PortAudio and sound devices for
``duplex mic``, espeak-ng and Chromium for the tests, the pretrained checkpoints in the Hugging Face
cache, free disk for pulling them, and whether ``duplex serve``'s port is free. Exits 1 when
something the README's main command (``duplex serve --profile tiny``) needs is missing, else 0.
Nothing here downloads or loads a model.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import socket
import sys
from dataclasses import dataclass
from importlib import util

from duplex.requirements import EXTRAS, FLOORS, INSTALL, WHAT_EXTRAS_ENABLE, installed, too_old

PYTHON_FLOOR = (3, 10)
CORE = ("torch", "transformers", "numpy", "soundfile", "soxr", "silero-vad", "aiohttp", "aiortc")
PULL_GB = 12.0  # the three pretrained checkpoints, with room to spare


@dataclass(frozen=True)
class Check:
    verdict: str  # "ok", "warn" (optional or degraded), "FAIL" (the default path cannot run)
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.verdict:4s}  {self.what}" + (f"\n      -> {self.fix}" if self.fix else "")


def python() -> list[Check]:
    v = sys.version_info
    ok = (v.major, v.minor) >= PYTHON_FLOOR
    return [Check("ok" if ok else "FAIL", f"Python {platform.python_version()} ({sys.executable})",
                  "" if ok else f"duplex needs Python >= {'.'.join(map(str, PYTHON_FLOOR))}")]


def packages() -> list[Check]:
    out = []
    for package in CORE:
        version = installed(package)
        if version is None:
            out.append(Check("FAIL", f"{package}: not installed", INSTALL.get(package, "pip install -e .")))
            continue
        problem = too_old(package, version)
        out.append(Check("FAIL", problem) if problem else
                   Check("ok", f"{package} {version} (needs >= {FLOORS.get(package, 'any')})"))
    return out


def extras() -> list[Check]:
    out = []
    for extra, modules in EXTRAS.items():
        present = util.find_spec(modules[0]) is not None
        detail = WHAT_EXTRAS_ENABLE[extra]
        if present and extra == "asr":
            problem = too_old("nemo_toolkit")
            if problem:
                out.append(Check("FAIL", problem))
                continue
        verdict = "ok" if present else ("FAIL" if extra == "asr" else "warn")
        out.append(Check(verdict, f"extra [{extra}] {'installed' if present else 'missing'}: {detail}",
                         "" if present else f"pip install -e '.[{extra}]'"))
    return out


def devices() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("FAIL", "torch cannot be imported", INSTALL["torch"])]
    out = [Check("ok", f"CPU: {torch.get_num_threads()} torch threads")]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Check("ok" if bf16 else "warn", f"CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s), "
                                                   f"{name}, bf16 {'yes' if bf16 else 'no'}",
                         "" if bf16 else "this GPU has no bf16: models run slower in fp32"))
    else:
        built = torch.version.cuda
        out.append(Check("warn", f"no CUDA GPU ({'CUDA build ' + built if built else 'a CPU build of torch'}): "
                                 "the tiny profile runs, real models are not real time on a CPU",
                         "on a GPU machine install its CUDA build of torch"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(Check("warn", "Apple MPS is available but duplex runs on CUDA or the CPU only"))
    return out


def sound() -> list[Check]:
    try:
        from duplex.transport.devices import NoAudioDevice, sounddevice
    except Exception as exc:  # transport needs aiortc; reported above
        return [Check("warn", f"sound devices not checked ({exc})")]
    try:
        sd = sounddevice()
        devs = sd.query_devices()
        inputs = sum(1 for d in devs if d.get("max_input_channels", 0) > 0)
        outputs = sum(1 for d in devs if d.get("max_output_channels", 0) > 0)
        verdict = "ok" if inputs and outputs else "warn"
        return [Check(verdict, f"PortAudio: {inputs} input and {outputs} output devices (duplex mic)",
                      "" if verdict == "ok" else "no microphone or speaker here: use duplex serve and a browser")]
    except NoAudioDevice as exc:
        return [Check("warn", f"duplex mic cannot run: {exc}")]


def tools() -> list[Check]:
    out = []
    for exe, use, fix in (("espeak-ng", "speech with known text for tests and benchmarks", "apt-get install espeak-ng"),
                          ("chromium", "the browser test", "apt-get install chromium chromium-driver"),
                          ("chromedriver", "the browser test", "apt-get install chromium-driver")):
        path = shutil.which(exe) or (shutil.which("chromium-browser") if exe == "chromium" else None)
        out.append(Check("ok" if path else "warn", f"{exe}: {path or 'not found'} ({use})", "" if path else fix))
    return out


def checkpoints() -> list[Check]:
    try:
        from duplex.config import AgentConfig
        from duplex.models import status
    except Exception as exc:
        return [Check("warn", f"pretrained checkpoints not checked ({exc})")]
    out = []
    try:
        rows = status(AgentConfig(profile="pretrained"))
    except Exception as exc:
        return [Check("warn", f"pretrained checkpoints not checked ({type(exc).__name__}: {exc})")]
    for ck, state in rows:
        missing = state.startswith("missing")
        shown = "not in the local Hugging Face cache" if missing else state
        out.append(Check("warn" if missing else "ok", f"{ck.role} checkpoint {ck.repo}: {shown}",
                         "duplex models pull (the pretrained profile, the default of duplex serve)" if missing else ""))
    return out


def disk() -> list[Check]:
    from pathlib import Path

    where = Path.home() / ".cache"
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free / 1e9
    ok = free >= PULL_GB
    return [Check("ok" if ok else "warn", f"{free:.1f} GB free under {where} (pulling the pretrained models "
                                          f"takes about {PULL_GB:.0f} GB)", "" if ok else "free some disk first")]


def port(host: str, number: int) -> list[Check]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, number))
        except OSError as exc:
            return [Check("warn", f"{host}:{number} is taken ({exc.strerror}): duplex serve cannot use it",
                          f"stop what holds it, or duplex serve --port {number + 1}")]
    return [Check("ok", f"{host}:{number} is free for duplex serve")]


def run_checks(host: str = "127.0.0.1", number: int = 8080) -> list[tuple[str, list[Check]]]:
    return [("Python", python()), ("packages", packages()), ("extras", extras()), ("devices", devices()),
            ("sound", sound()), ("tools", tools()), ("models", checkpoints()), ("disk", disk()),
            ("network", port(host, number))]


def main(args: argparse.Namespace) -> int:
    sections = run_checks(args.host, args.port)
    failed = 0
    for title, checks in sections:
        print(f"{title}:")
        for check in checks:
            print("  " + check.line().replace("\n", "\n  "))
            failed += check.verdict == "FAIL"
    print(f"\n{'something the default path needs is missing (FAIL above)' if failed else 'ready'}: "
          f"{failed} failed, {sum(c.verdict == 'warn' for _, cs in sections for c in cs)} warnings")
    return 1 if failed else 0
