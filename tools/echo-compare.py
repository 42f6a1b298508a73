"""The echo-canceller comparison: WebRTC's AEC3 (what ``duplex mic`` runs) beside the hand-written
frequency-domain NLMS canceller this project used before it, taken from git history, in the
scenarios of ``duplex bench echo`` (see duplex/transport/echo_bench.py for what each figure means).

Run from the repository: ``.venv/bin/python tools/echo-compare.py``.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

HAND_WRITTEN_AT = "ac8b9f2"  # the last commit whose transport/echo.py held the hand-written canceller


def hand_written() -> types.ModuleType:
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{HAND_WRITTEN_AT}:transport/echo.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("echo_hand_written")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{HAND_WRITTEN_AT}:transport/echo.py", "exec"), module.__dict__)
    return module


def main() -> None:
    from duplex.transport.echo_bench import Candidate, compare, shipped

    old = hand_written()
    compare([*shipped(), Candidate("hand-written nlms", old.EchoCanceller, old.EchoGuard)])


if __name__ == "__main__":
    sys.exit(main())
