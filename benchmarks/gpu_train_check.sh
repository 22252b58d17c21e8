#!/usr/bin/env bash
# One-command train-step check on one GPU (under 8 minutes): ours against PyTorch (eager,
# autocast bf16, SDPA, fused AdamW; torch.compile when time is left), BERT-base at the
# paper's shapes, global batch 256 and 1024, in alternating worker processes; then
# ablations of ours. Writes the table to $OUT/gpu_train.md (and .json); with
# --write-benchmarks also into BENCHMARKS.md. See benchmarks/gpu_train_vs_torch.py.
#
#   device tool: run(command="bash benchmarks/gpu_train_check.sh", timeout_s=540)
#   bash benchmarks/gpu_train_check.sh --cpu-smoke    # tiny shapes on CPU: is it broken?
#
# Needs only jax (CUDA), flax, optax, numpy, torch and transformers: the GPU image has no
# ml_collections, clu, TensorFlow or NLTK, and the step needs none of them.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"
else py="python3"; fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
# Each worker takes the memory it needs (a side at batch 1024 needs most of the device).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || true
# The parent stops starting measurements after --budget-s (default 420 s).
exec timeout 470 "$py" benchmarks/gpu_train_vs_torch.py "$@"
