#!/usr/bin/env bash
# Every GPU figure of the engines in one run (about 8 minutes on one H100/H200): package versions, what
# a kernel launch, a graph-replayed kernel and a host sync cost (tools/launch-costs.py), the VAD's tick
# (tools/vad-step-cost.py: its captured step against the TorchScript network it replaced), then
# `duplex bench asr --quick` (the captured steady ASR step and endpoint flush), `duplex bench llm` (Qwen2.5-1.5B, batches
# 1 8 32), `duplex bench tts` (CSM-1B, batches 1 8 32 64) and `duplex bench e2e` (all three models, a
# sweep of concurrent sessions in real time, the models in the engine core process and the sessions
# in the bench's, as `duplex serve` splits them for many sessions), each with CUDA graphs captured and, for llm and tts,
# eager side by side, with the replies of both compared (greedy LLM text, seeded TTS audio: they must
# be equal). COMPILE=1 fuses the layers with torch.compile (--compile) and compares them with the
# unfused ones. JSON lands in $OUT (default artifacts/gpu); on the device, as one archive,
# gpu-check.tgz (the device returns at most 8 files). ONLY=capacity runs `duplex bench capacity`
# instead (real aiortc peers, eight to a process, into `duplex serve --workers 4` around one engine
# core; about 5 minutes): its wheels are a second carry, so it is a second call on the same warm machine.
#
#   here, once:     bash tools/gpu-wheels.sh      (wheels of the versions CI uses, into .whl/ and .whl-transport/)
#   on the device:  run(command="bash tools/gpu-check.sh", carry=[".whl"], timeout_s=480)
#   then, warm:     run(command="ONLY=capacity bash tools/gpu-check.sh", carry=[".whl-transport"], timeout_s=420)
#   on the CPU:     DEVICE=cpu PROFILE=tiny bash tools/gpu-check.sh   (a smoke run of the same script;
#                   ONLY=capacity DEVICE=cpu PROFILE=tiny for the capacity part)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu}
DEVICE=${DEVICE:-cuda}
PROFILE=${PROFILE:-random}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DUPLEX_CACHE=${DUPLEX_CACHE:-/tmp/duplex-cache}
PY=python3
if [ -x .venv/bin/python ] && [ "$DEVICE" = cpu ]; then PY=.venv/bin/python; fi
if [ "$DEVICE" != cpu ]; then  # each carried set once per machine (a second call finds the first's)
  for dir in .whl .whl-transport; do
    if [ -d "$dir" ] && [ ! -e "/tmp/site/.installed$dir" ]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl \
        || { echo "wheel install from $dir failed"; exit 1; }
      touch "/tmp/site/.installed$dir"
    fi
  done
  export PYTHONPATH=/tmp/site
fi
if [ "$DEVICE" != cpu ]; then  # the package itself, without dependency resolution (the device brings its own torch)
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
    || { echo "editable install failed"; exit 1; }
fi
DUPLEX="$PY -m duplex.cli"
$PY - <<'PY'
import importlib.metadata as m, platform
print("python", platform.python_version())
for p in ("torch", "triton", "transformers", "huggingface-hub", "tokenizers", "numpy", "nemo_toolkit", "lightning",
          "silero-vad", "soxr", "soundfile", "aiortc", "av",
          "omegaconf", "lhotse", "librosa", "duplex"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "not installed")
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
PY
status=0
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^WARNING\|Warning:" ; local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || status=1
}
pack() {  # the device returns at most 8 files: one archive of them all
  if [ "$DEVICE" != cpu ]; then
    (cd "$OUT" && tar czf gpu-check.tgz --exclude=gpu-check.tgz ./*.log ./*.json 2>/dev/null \
       && find . -maxdepth 1 -type f ! -name gpu-check.tgz ! -name '*.png' -delete)
  fi
}
if [ "${ONLY:-}" = capacity ]; then
  run capacity 400 $DUPLEX bench capacity --device "$DEVICE" --profile "$PROFILE" --workers 4 --out "$OUT"
  pack
  exit $status
fi
echo; $PY tools/launch-costs.py --device "$DEVICE" | tee "$OUT/launch-costs.log"
echo; timeout 60 $PY tools/vad-step-cost.py --device "$DEVICE" --ticks 200 2>&1 | tee "$OUT/vad-step.log"
if [ "$PROFILE" = tiny ]; then LLM=(); else LLM=(--llm-model qwen2.5-1.5b); fi
if [ "${COMPILE:-0}" = 1 ]; then LLM+=(--compile); FUSE=(--compile); else FUSE=(); fi
run asr 90 $DUPLEX bench asr --device "$DEVICE" --profile "$PROFILE" --quick --out "$OUT"
run llm 110 $DUPLEX bench llm --device "$DEVICE" --profile "$PROFILE" "${LLM[@]}" --batch 1 8 32 --out "$OUT"
run tts 130 $DUPLEX bench tts --device "$DEVICE" --profile "$PROFILE" "${FUSE[@]}" --batch 1 8 32 64 --out "$OUT"
run e2e 200 $DUPLEX bench e2e --device "$DEVICE" --profile "$PROFILE" "${FUSE[@]}" --engine-core process --out "$OUT"
echo
if grep -q "DIFFER" "$OUT/llm.log" "$OUT/tts.log" 2>/dev/null; then
  echo "=== captured steps DIFFER from eager ones (see the batch lines above): a regression"; status=1
elif grep -q "equal)" "$OUT/llm.log" 2>/dev/null; then
  echo "=== captured steps say and make exactly what eager ones do (every batch size, llm and tts)"
fi
grep -h "fused layers\|launch costs" "$OUT"/*.log 2>/dev/null
pack
exit $status
