#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64, no network there) of the packages duplex needs that
# its image lacks, at the versions in tools/gpu-wheels.txt (ones that install and import there), into
# .whl/ (ignored by git; carried to the device by tools/gpu-check.sh's caller: carry=[".whl"]); and
# the WebRTC transport's (tools/gpu-wheels-transport.txt, for `bench capacity`) into .whl-transport/,
# carried by a second call (each call carries at most 64 MiB).
# Run here, from the repository root: bash tools/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .whl-transport && mkdir -p .whl .whl-transport
list=$(mktemp)
grep -v '^#' tools/gpu-wheels.txt | grep -v '^antlr4-python3-runtime' > "$list"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl -r "$list"
# Pure-Python packages published as source only: build their wheels here.
grep '^antlr4-python3-runtime' tools/gpu-wheels.txt | xargs -r python3 -m pip wheel -q --no-deps -w .whl
grep -v '^#' tools/gpu-wheels-transport.txt > "$list"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl-transport -r "$list"
rm -f "$list"
du -sh .whl .whl-transport
ls .whl .whl-transport | wc -l
