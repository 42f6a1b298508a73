#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64, no network there) of the packages duplex needs
# that its image lacks, at the versions this checkout's CI installs (read from .venv), into .whl/
# (ignored by git; carried to the device by tools/gpu-check.sh's caller: carry=[".whl"]).
# Run here, from the repository root, after the README's setup command: bash tools/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Binary or universal wheels on PyPI (the device image already has torch, numpy, scipy, sklearn,
# tokenizers, huggingface-hub, sentencepiece, lightning, matplotlib, aiohttp, ...).
PACKAGES="transformers silero-vad soxr soundfile cffi pycparser nemo-toolkit omegaconf hydra-core lhotse
librosa audioread pooch decorator lazy-loader braceexpand webdataset kaldialign intervaltree cytoolz
text-unidecode smart-open aistore"
specs=()
for p in $PACKAGES; do
  v=$(version "$p" 2>/dev/null) && specs+=("$p==$v") || echo "($p not installed here: skipped)"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${specs[@]}"
# Pure-Python packages published as source only: build their wheels here.
for p in antlr4-python3-runtime; do
  v=$(version "$p" 2>/dev/null) && python3 -m pip wheel -q --no-deps -w .whl "$p==$v"
done
du -sh .whl
ls .whl
