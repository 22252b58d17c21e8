#!/usr/bin/env bash
# One-command train-step check on an accelerator (under 8 minutes): BERT-base at the
# paper's shapes (text 70 tokens; image = 20 tag tokens + 50 regions of 2054 dims; both
# hard negatives, so 4 encodes per pair), bfloat16 compute, the trainer's own jitted
# step on all local devices. Prints, and writes to $OUT/gpu_train.md when $OUT is set, a
# markdown table: per-device batch doubling from 64 until out of memory (XLA's
# RESOURCE_EXHAUSTED is caught), with compile time, ms/step, pairs/s, model TFLOP/s,
# MFU against the device's bf16 dense peak (H100 SXM / H200: 989, A100: 312 TFLOP/s),
# XLA's temp memory; then one remat=True trial at the first batch that did not fit.
#
#   bash benchmarks/gpu_train_check.sh                # on the GPU machine
#   bash benchmarks/gpu_train_check.sh --cpu-smoke    # tiny shapes on CPU: is it broken?
#   bash benchmarks/gpu_train_check.sh --start-batch 64 --budget-s 200   # other options:
#                                                     # .venv/bin/python benchmarks/bench_train.py -h
#
# Python: $PYTHON, else the repository's .venv, else python3. A jax without a GPU
# backend gets `pip install "jax[cuda12]"` (needs a package index; the lent machines
# have no network but ship a CUDA jax). ml_collections and clu, absent on such images,
# are replaced by minimal stand-ins inside bench_train.py (the step does not need them).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"
else py="python3"; fi

smoke=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done

export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [ "$smoke" = 0 ]; then
  # Let the search use nearly all of the device memory (JAX's default is 75%).
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
  if ! "$py" -c "import jax, sys; sys.exit(0 if jax.default_backend() in ('gpu', 'cuda', 'rocm') else 1)" 2>/dev/null; then
    echo "[gpu-check] $py has no GPU jax: installing jax[cuda12]"
    "$py" -m pip install -q -U "jax[cuda12]" || {
      echo "[gpu-check] could not install jax[cuda12] (no network?); giving up" >&2; exit 1; }
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true
fi
"$py" -c "import jax, flax, optax; print('[gpu-check] python', __import__('sys').version.split()[0], \
'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'backend', jax.default_backend())"

# The whole check stays under 8 minutes: the search starts no new batch size after
# --budget-s (default 330 s) and the command is killed at 470 s.
exec timeout 470 "$py" benchmarks/bench_train.py --gpu-check "$@"
