#!/usr/bin/env bash
# The GPU check: one command that proves the CUDA path on a lent GPU machine within ~8 minutes.
#
#   make gpu-bundle                      # here: writes .gpu/ (wheels + this script as check.sh)
#   bash .gpu/check.sh OUT               # there, in the repository root, .gpu carried along
#   make gpu-check-dry                   # here: the same script on the CPU with tiny sizes
#
# 1. tests/gpu (on CUDA; with --dry on the CPU through DDPM_GPU_TESTS_DEVICE=cpu)
# 2. the stage commands on the default 35.7M network at 32 px (scripts/stage_run.py): prepare
#    synthetic data, train 2,000 steps, sample 1,000 images, evaluate, the bound of 200 images
#    (nll); each stage timed
# 3. benchmarks/bench_gpu.py: training img/s (eager, compiled), MFU, peak memory; sampling
#    img/s and the samplers' overhead at batch 256, bf16 against fp32; FID of 10,000 images
# 4. OUT/report.md and OUT/report.json: every step's status and time, the figures; beside
#    them only each step's log (the device tool brings back at most 8 files)
#
# Each step has a time limit and the next one runs whatever happened; the exit status is
# non-zero when any step failed. The machine has no network and no MLflow: tracking is off.
set -uo pipefail

OUT="${1:?usage: check.sh OUT_FOLDER [--dry]}"
DRY="${2:-}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/ddpm-gpu-check.XXXXXX")}"
SITE=""
cleanup() {  # a work folder of its own (no GPU_CHECK_WORK) and the wheels' site go at exit
  [ -n "${GPU_CHECK_WORK:-}" ] || rm -rf "$WORK"
  [ -z "$SITE" ] || rm -rf "$SITE"
}
trap cleanup EXIT
SCRATCH="$WORK/check"  # what the report is built from
mkdir -p "$SCRATCH"
STEPS="$SCRATCH/steps.tsv"
: >"$STEPS"
cd "$ROOT"

export DDPM_TRACKING=false PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -d "$HERE/wheels" ] && [ "$DRY" != "--dry" ]; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/ddpm-site.XXXXXX")"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$HERE"/wheels/*.whl || { echo "installing the bundled wheels failed" >&2; exit 3; }
  export PYTHONPATH="$SITE:$ROOT"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY" = "--dry" ]; then
  export DDPM_GPU_TESTS_DEVICE=cpu
  # What the GPU machine lacks is made unimportable here as well, so the dry run fails where
  # the real one would (a stage that imports MLflow with tracking off, say).
  for pkg in mlflow dvc diffusers; do
    mkdir -p "$SCRATCH/absent/$pkg"
    echo "raise ImportError('$pkg is not on the GPU machine')" >"$SCRATCH/absent/$pkg/__init__.py"
  done
  export PYTHONPATH="$SCRATCH/absent:$PYTHONPATH"
  LIMITS=(600 300 300)
  STAGE_ARGS=(--preset smoke --set data.num_images=120 --set train.steps=8
    --set train.val_every=4 --set train.checkpoint_every=4 --set train.sample_every=8
    --set sample.num_images=16 --set sample.batch_size=16 --set sample.steps=4
    --set sample.grid_images=16 --set evaluate.kid=false --set evaluate.isc=false
    --stages download,prepare,train,sample,evaluate,nll)
  BENCH_ARGS=(--dry)
else
  LIMITS=(150 200 200)
  STAGE_ARGS=(--preset gpu)
  BENCH_ARGS=()
fi

step() {  # step NAME LIMIT_S COMMAND...: run, time, record "name<TAB>status<TAB>seconds"
  local name="$1" limit="$2" start code
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  code=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$code" "$(($(date +%s) - start))" >>"$STEPS"
  echo "=== $name: exit $code in $(($(date +%s) - start)) s"
}

{
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  "$PY" -c 'import pydantic, pydantic_settings, torch_fidelity, typer;
print("pydantic", pydantic.VERSION, "torch-fidelity", torch_fidelity.__version__)'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
} >"$SCRATCH/environment.txt" 2>&1
cat "$SCRATCH/environment.txt"

step tests "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/gpu \
  --junitxml="$SCRATCH/tests.xml"
step stages "${LIMITS[1]}" "$PY" scripts/stage_run.py "$WORK" "${STAGE_ARGS[@]}" \
  --report "$SCRATCH/stages.json"
WEIGHTS=()
[ -f "$WORK/models/ema.pt" ] && WEIGHTS=(--weights "$WORK/models/ema.pt")
step bench "${LIMITS[2]}" "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" "${WEIGHTS[@]}" \
  --json "$SCRATCH/bench.json" --markdown "$SCRATCH/bench.md"

"$PY" scripts/gpu_report.py "$SCRATCH" "$OUT" || exit 4
# steps.tsv is read before the work folder goes (cleanup, at exit)
awk -F'\t' '$2 != 0 { failed = 1 } END { exit failed }' "$STEPS"
