"""``duplex bench``: run the benchmarks of each stage and of the whole pipeline.

Each benchmark is a ``run(args) -> dict`` function in the package it measures; it prints its own table
as it goes and returns its figures, which are written to ``<out>/<name>.json`` with the machine they
were measured on. Speed lives here, never in test assertions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from duplex.errors import UserError
from duplex.worker import configure_torch

BENCHES: dict[str, str] = {
    "asr": "duplex.asr.bench:run",
    "llm": "duplex.llm.bench:run",
    "tts": "duplex.tts.bench:run",
    "e2e": "duplex.e2e:run",
    "endurance": "duplex.endurance:run",
    "transport": "duplex.transport.bench:run",
    "capacity": "duplex.transport.capacity:run",
    "echo": "duplex.transport.echo_bench:run",
    "barge-in": "duplex.transport.barge_bench:run",
    "cluster": "duplex.cluster.bench:run",
    "turns": "duplex.turntaking:run",
}
ALL = ("asr", "llm", "tts", "e2e")  # what `bench all` runs (endurance is long: run it on its own)


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import os

    import torch

    info: dict[str, object] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for package in ("transformers", "numpy", "nemo_toolkit", "aiortc"):
        info[package] = _version(package)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main(args: argparse.Namespace) -> int:
    names = list(ALL) if args.what == "all" else [args.what]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device:
        configure_torch(args.device)
    info = machine()
    print(f"# duplex bench {args.what}: profile={args.profile} device={args.device or 'auto'} {info}")
    failed = []
    for name in names:
        module_name, func = BENCHES[name].split(":")
        run = getattr(importlib.import_module(module_name), func)
        print(f"\n## {name}", flush=True)
        t0 = time.perf_counter()
        try:
            figures = run(args)
        except UserError:
            raise
        except Exception as exc:  # one benchmark failing must not cost the figures of the others
            traceback.print_exc()
            print(f"(benchmark {name} failed: {type(exc).__name__}: {exc})")
            failed.append(name)
            continue
        elapsed = time.perf_counter() - t0
        path = out / f"{name}.json"
        path.write_text(json.dumps({"machine": info, "profile": args.profile, "seconds": round(elapsed, 1),
                                    "figures": figures}, indent=2, default=str))
        print(f"(wrote {path}; {elapsed:.0f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0
