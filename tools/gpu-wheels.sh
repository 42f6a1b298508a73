#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64, no network there) of the packages duplex needs that
# its image lacks, at the versions in tools/gpu-wheels.txt (ones that install and import there), into
# .whl/ (ignored by git; carried to the device by tools/gpu-check.sh's caller: carry=[".whl"]).
# Run here, from the repository root: bash tools/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
list=$(mktemp)
grep -v '^#' tools/gpu-wheels.txt | grep -v '^antlr4-python3-runtime' > "$list"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl -r "$list"
# Pure-Python packages published as source only: build their wheels here.
grep '^antlr4-python3-runtime' tools/gpu-wheels.txt | xargs -r python3 -m pip wheel -q --no-deps -w .whl
rm -f "$list"
du -sh .whl
ls .whl | wc -l
