#!/usr/bin/env bash
# One prepared GPU run of both benchmarks (issues 4 and 5), results under $OUT.
#
# The device image has jax, flax, optax, orbax, chex, absl-py, scipy and
# matplotlib but not ml-collections, nibabel or pydicom, which stnjax imports;
# they travel as wheels. Here, once, from the repository root:
#
#   bash bench/device_check.sh --fetch     # downloads them into .whl/ (gitignored)
#
# Then on the device (the `device` tool; carry [".whl"], timeout_s 560; the
# parts are limited to 250 s, 210 s and 80 s: TRAIN_LIMIT, INFER_LIMIT,
# ABLATION_LIMIT):
#
#   bash bench/device_check.sh
#
# A dry run here on CPU at the tiny sizes: SMALL=1 bash bench/device_check.sh
#
# Each benchmark has its own time limit, so one slow part cannot eat the
# other's share; the logs and JSON files come back under $OUT. Copy the
# figures into bench/RESULTS.md with the date and the device name printed
# at the top of the log.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  for pkg in ml-collections nibabel pydicom; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl "$pkg" || exit 1
  done
  ls -l .whl
  exit 0
fi

OUT=${OUT:-/tmp/stnjax-bench}
SIZE_ARGS=()
[ -n "${SMALL:-}" ] && SIZE_ARGS=(--small)
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/device.txt"

timeout "${TRAIN_LIMIT:-250}" python3 -m bench.train_step "${SIZE_ARGS[@]}" --out="$OUT/train_step.json" 2>&1 \
  | tee "$OUT/train_step.log"
timeout "${INFER_LIMIT:-210}" python3 bench/inference.py "${SIZE_ARGS[@]}" --json="$OUT/inference.json" 2>&1 \
  | tee "$OUT/inference.log"
# Ablation: the same J step with XLA's select-and-scatter pooling gradient
# (bit-identical results; does the elementwise gradient in the code pay off?).
timeout "${ABLATION_LIMIT:-80}" python3 -m bench.train_step "${SIZE_ARGS[@]}" --pool=window \
  --dtypes=bfloat16 --batches=1 --steps=10 --out="$OUT/train_step_pool_window.json" 2>&1 \
  | tee "$OUT/train_step_pool_window.log"
