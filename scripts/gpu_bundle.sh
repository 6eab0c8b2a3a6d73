#!/usr/bin/env bash
# `make gpu-bundle`: .gpu/ for a lent GPU machine (Python 3.12, x86-64, no network): the wheels
# of what the stage commands import and that machine lacks, at this project's locked versions,
# and the check script as .gpu/check.sh. Carry `.gpu` to the machine and run
# `bash .gpu/check.sh OUT` in the repository root (scripts/gpu_check.sh says what it does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LIMIT_MIB=60
# There already: torch, torchvision, numpy, scipy, pillow, pyyaml, safetensors, tqdm, matplotlib,
# rich, pytest. MLflow and DVC are left out: the check runs with DDPM_TRACKING=false, no DVC.
PACKAGES=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types
  typing-inspection typing-extensions torch-fidelity typer click shellingham)

version() {  # the locked version of a package, from requirements.lock
  grep -i -m1 "^$1==" requirements.lock | sed 's/ .*//; s/.*==//'
}

rm -rf .gpu
mkdir -p .gpu/wheels
for name in "${PACKAGES[@]}"; do
  v="$(version "$name")"
  [ -n "$v" ] || { echo "$name is not in requirements.lock" >&2; exit 1; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/wheels "$name==$v"
done
cp scripts/gpu_check.sh .gpu/check.sh
size=$(du -sm .gpu | cut -f1)
ls -1 .gpu/wheels
echo ".gpu: ${size} MiB (limit ${LIMIT_MIB})"
[ "$size" -le "$LIMIT_MIB" ] || { echo ".gpu is over ${LIMIT_MIB} MiB" >&2; exit 1; }
