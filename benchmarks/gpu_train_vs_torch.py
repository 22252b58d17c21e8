#!/usr/bin/env python
"""The train step on one accelerator, ours against PyTorch, side by side.

BERT-base at the paper's shapes (caption 70 tokens; image 20 tag tokens + 50 regions of
2054 dims; both hard negatives, so 4 encodes per pair), bf16 compute, float32 params and
AdamW, hidden dropout 0.1 and no attention-probability dropout on both sides (fused
attention kernels take none; see `model.py`). Each measurement runs in its own worker
process, and the two sides alternate (ours, PyTorch, ours, PyTorch at each batch): at
global batch 1024 each side needs most of the device's memory, so they cannot share one
process. JAX's persistent compilation cache spares the second round a recompile; the
compile time reported is the first (cold) one.

  ours    = `train.Trainer(...).compile_step`, the trainer's jitted, donated step on a
            1-device mesh (cuDNN fused attention, scanned layers, the configured dropout
            PRNG, the layers on the real tokens packed into slots), on the batch as
            `train.shape_batch` hands it over, as `bin/train` runs it;
  PyTorch = what a PyTorch user writes with no effort: `transformers` `BertModel` (SDPA
            attention) + Oscar's region embedding, eager, `torch.autocast(bfloat16)`,
            `AdamW(fused=True)`, `clip_grad_norm_`, the same loss;
  PyTorch compiled = the same step with the forward and loss under `torch.compile`
            (when time is left and it compiles within its share of the budget).

Then, with time left, variants of ours at batch 256 (padded rows, `packing_bucket=0`;
straight-line layers, `scan_layers=False`; XLA attention; threefry dropout; cuBLAS for
every matrix product instead of XLA's Triton GEMMs; distillation from a BERT-base
cross-encoder teacher over k = 4 and 8 candidates per query, `distill_candidates`). The synthetic rows have random real
lengths (half the padded length to all of it); both sides get the same batch, PyTorch
padded as it comes (its longest rows are about the padded maxima), ours packed. MFU
counts the padded shapes' FLOPs on both sides (the same work unit), so it is
throughput, not the FLOPs ours executes.
Writes a markdown table (ms/step, pairs/s, ratio, MFU against the bf16 dense peak,
compile s, peak memory) to stdout, to $OUT/gpu_train.md and, with --write-benchmarks, into
BENCHMARKS.md. Needs only jax, flax, optax, numpy, torch and transformers (no
ml_collections, clu, TensorFlow or NLTK: the step imports none of them).

  bash benchmarks/gpu_train_check.sh               # on the GPU machine, < 8 minutes
  bash benchmarks/gpu_train_check.sh --cpu-smoke   # tiny shapes on CPU: does it run?
  PYTHONPATH=benchmarks/gpu_image bash benchmarks/gpu_train_check.sh --cpu-smoke
                                                   # ... with the GPU image's modules only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

if "--cpu-smoke" in sys.argv:
  os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

import bench_train as bt  # noqa: E402
from vldeformer_jax.config import FEATURE_DIM  # noqa: E402

PAPER = bt.Shapes(70, 20, 50, FEATURE_DIM)
SMOKE = bt.Shapes(16, 8, 4, FEATURE_DIM)
SECTION = "## Train step on a GPU: ours vs PyTorch"


# ------------------------------------------------------------------ workers

def _ours(a, shapes: bt.Shapes, variant: dict) -> dict:
  import jax
  from vldeformer_jax.model import init_params
  cache = os.environ.get("BENCH_JAX_CACHE")
  if cache:  # the parent's own cache: a program a worker loads is marked "(cached)"
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if not a.cpu_smoke and jax.default_backend() == "cpu":
    raise SystemExit("jax has no GPU backend here (JAX_PLATFORMS="
                     f"{os.environ.get('JAX_PLATFORMS')!r}); not timing a CPU as a GPU")
  size, dtype = ("tiny", "float32") if a.cpu_smoke else ("base", "bfloat16")
  cfg = bt.train_config()
  cfg.dtype = dtype
  cfg.dropout_rng = variant.get("dropout_rng", cfg.dropout_rng)
  cfg.packing_bucket = variant.get("packing_bucket", cfg.packing_bucket)
  teacher = None
  if variant.get("distill_candidates"):  # a teacher of the student's size scores pairs
    from pathlib import Path as _Path
    from vldeformer_jax import distill
    from vldeformer_jax.model import VLBert
    cfg.distill_weight, cfg.distill_candidates = 1.0, variant["distill_candidates"]
    cfg.teacher_mode = variant.get("teacher_mode", "joint")
  mc = bt.model_config(size, shapes, dtype=dtype,
                       attention_impl=variant.get("attention_impl", "auto"),
                       attention_probs_dropout_prob=variant.get("attention_dropout", 0.0),
                       scan_layers=variant.get("scan_layers", True))
  stage(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; building")
  params = jax.device_get(init_params(mc, jax.random.key(0)))
  if cfg.distill_weight:
    teacher = distill.Teacher(VLBert(mc), jax.device_get(init_params(mc, jax.random.key(1))),
                              cfg.teacher_mode, _Path("random"))
  batch = bt.make_batch(np.random.default_rng(a.batch), a.batch, shapes)
  stage("params and batch ready; compiling the step")
  step = bt.OursStep(cfg, mc, params, batch, num_devices=1, teacher=teacher)
  stage(f"traced and lowered in {step.lower_s:.1f} s, compiled in {step.compile_s:.1f} s; "
        "timing")
  from vldeformer_jax.model import use_fused_attention
  times = _time(step, a.warmup, a.steps)
  stage("timed")
  stats = jax.devices()[0].memory_stats() or {}
  return dict(compile_s=step.compile_s, times=times, loss=step(),
              peak_bytes=stats.get("peak_bytes_in_use"),
              fused_attention=use_fused_attention(mc, deterministic=True),
              flops_pair=bt.train_flops_per_pair(mc, shapes)["total"],
              versions=f"jax {jax.__version__}", device=jax.devices()[0].device_kind)


def _torch(a, shapes: bt.Shapes, variant: dict) -> dict:
  import torch
  import transformers
  device = "cpu" if a.cpu_smoke else "cuda"
  if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA device here; not timing a CPU as a GPU")
  size = "tiny" if a.cpu_smoke else "base"
  model = bt.torch_model(bt.model_config(size, shapes, attention_probs_dropout_prob=0.0)
                        ).to(device)
  cfg = bt.train_config()
  step = bt.TorchStep(model, cfg, bt.make_batch(np.random.default_rng(a.batch), a.batch,
                                                shapes),
                      device=device, autocast=not a.cpu_smoke,
                      compile=variant.get("compile", False))
  stage(f"torch {torch.__version__}: model and batch ready")
  t0 = time.perf_counter()
  step()  # the first call compiles under torch.compile
  compile_s = time.perf_counter() - t0 if variant.get("compile") else None
  stage("first step done; timing")
  times = _time(step, a.warmup, a.steps)
  stage("timed")
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return dict(compile_s=compile_s, times=times, loss=step(), peak_bytes=peak,
              attention=model.bert.config._attn_implementation,
              versions=f"torch {torch.__version__}, transformers {transformers.__version__}")


def _time(step, warmup: int, steps: int) -> list[float]:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()  # returns the loss as a Python float: waits for the device
    times.append(time.perf_counter() - t0)
  return times


def stage(msg: str) -> None:
  print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


def worker(a) -> None:
  import faulthandler
  faulthandler.dump_traceback_later(60, repeat=True, file=sys.stderr)
  variant = json.loads(a.variant)
  if variant.get("xla_flags"):  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + variant["xla_flags"]).strip()
  shapes = SMOKE if a.cpu_smoke else PAPER
  import importlib.util
  absent = [m for m in ("ml_collections", "clu", "tensorflow", "nltk", "tensorboard")
            if importlib.util.find_spec(m) is None]
  stage("not installed here: " + (", ".join(absent) or "none of them"))
  out = (_ours if a.worker == "ours" else _torch)(a, shapes, variant)
  print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ the parent

def run_worker(a, side: str, batch: int, variant: dict, timeout: float,
               log: Path) -> dict:
  """One worker process; its stderr (stage times, and a Python stack every 60 s while
  it runs) is appended to `log`, so a worker cut at its timeout still says where."""
  args = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--batch",
          str(batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
          "--variant", json.dumps(variant)] + (["--cpu-smoke"] if a.cpu_smoke else [])
  t0 = time.perf_counter()
  with open(log, "a") as err:
    err.write(f"\n=== {side} batch {batch} {json.dumps(variant)} (timeout {timeout:.0f} s)\n")
    err.flush()
    try:
      proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=err, text=True,
                            timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
      print(f"[gpu-train] {side} batch {batch} {variant}: cut at {timeout:.0f} s "
            f"(see {log.name})", flush=True)
      return dict(side=side, batch=batch, variant=variant,
                  status=f"cut at its {timeout:.0f} s budget")
  wall = time.perf_counter() - t0
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    tail = log.read_text().strip().splitlines()[-15:]
    oom = any(k in "\n".join(tail) for k in ("RESOURCE_EXHAUSTED", "out of memory",
                                              "Out of memory"))
    print(f"[gpu-train] {side} batch {batch} {variant} failed:\n" + "\n".join(tail),
          file=sys.stderr, flush=True)
    return dict(side=side, batch=batch, variant=variant,
                status="out of memory" if oom else f"failed: {tail[-1][:120] if tail else '?'}")
  res = json.loads(lines[-1][len("RESULT "):])
  res.update(side=side, batch=batch, variant=variant, status="ok", wall_s=wall)
  med = statistics.median(res["times"])
  print(f"[gpu-train] {side:5s} batch {batch:5d} {json.dumps(variant):40s} "
        f"{med * 1e3:8.1f} ms/step  {batch / med:7.0f} pairs/s  compile "
        f"{res['compile_s'] or 0:.1f} s  peak "
        f"{(res['peak_bytes'] or 0) / 2**30:.1f} GiB  ({wall:.0f} s)", flush=True)
  return res


def parent(a) -> None:
  t_start = time.perf_counter()
  budget = a.budget_s
  left = lambda: budget - (time.perf_counter() - t_start)
  batches = [8] if a.cpu_smoke else [int(b) for b in a.batches.split(",")]
  rows: list[dict] = []
  out_dir = Path(a.out or os.environ.get("OUT") or tempfile.mkdtemp())
  out_dir.mkdir(parents=True, exist_ok=True)
  cache = tempfile.mkdtemp(prefix="jax-cache-")
  os.environ["BENCH_JAX_CACHE"] = cache
  command = " ".join(["bash benchmarks/gpu_train_check.sh"] + a.passthrough)

  def report() -> str:
    md = render(rows, a, time.perf_counter() - t_start, command)
    (out_dir / "gpu_train.md").write_text(md + "\n")
    (out_dir / "gpu_train.json").write_text(json.dumps(rows, indent=1, default=str))
    return md

  log = out_dir / "workers.log"
  worker_s = a.worker_timeout_s

  def measure(side: str, b: int, variant: dict, cap: float = worker_s) -> dict:
    rows.append(run_worker(a, side, b, variant, min(cap, left()), log))
    report()
    return rows[-1]

  # The headline: each side at each batch, alternating processes, `rounds` rounds; a
  # round is skipped when the budget left cannot hold it.
  for r in range(a.rounds):
    for b in batches:
      if r and left() < 2 * worker_s * 0.6:
        print(f"[gpu-train] round {r + 1} at batch {b} skipped: {left():.0f} s left",
              flush=True)
        continue
      first = measure("ours", b, {})
      if r == 0 and first["status"] != "ok" and "memory" not in first["status"]:
        # Find out whether the fused attention is what fails: the XLA attention path.
        measure("ours", b, {"attention_impl": "xla"})
      measure("torch", b, {})
  # The smoke run checks that both sides run, not the GPU-only variants.
  extras = [] if a.cpu_smoke else [
      ("ours", {"packing_bucket": 0}), ("ours", {"scan_layers": False}),
      ("ours", {"attention_impl": "xla"}), ("ours", {"dropout_rng": "threefry2x32"}),
      ("ours", {"xla_flags": "--xla_gpu_enable_triton_gemm=false"}),
      ("ours", {"distill_candidates": 4}), ("ours", {"distill_candidates": 8}),
      ("torch", {"compile": True})]
  for side, variant in extras:
    done = any(r["variant"] == variant for r in rows)
    if done or left() < (150 if variant.get("compile") else 60):
      continue
    measure(side, batches[0], variant, left() - 5)
  md = report()
  print("\n" + md)
  if a.write_benchmarks:
    write_section(REPO / "BENCHMARKS.md", md)
    print(f"[gpu-train] wrote the section into {REPO / 'BENCHMARKS.md'}")


def _median_ms(rows: list[dict]) -> float | None:
  times = [t for r in rows if r["status"] == "ok" for t in r["times"]]
  return statistics.median(times) * 1e3 if times else None


def render(rows: list[dict], a, wall: float, command: str) -> str:
  ok = [r for r in rows if r["status"] == "ok"]
  ours_any = next((r for r in ok if r["side"] == "ours"), {})
  torch_any = next((r for r in ok if r["side"] == "torch"), {})
  device = ours_any.get("device", "?")
  peak = bt.peak_tflops(device, a.peak_tflops)
  flops = ours_any.get("flops_pair")
  lines = [SECTION, "",
           f"{datetime.date.today().isoformat()}, one {device}; {ours_any.get('versions', '?')}"
           f"; {torch_any.get('versions', '?')}; host {platform.node() or '?'}; command "
           f"`{command}`. BERT-base, paper shapes ({(SMOKE if a.cpu_smoke else PAPER).describe()}"
           "), 4 encodes per pair, bf16 compute, float32 params and AdamW, hidden dropout "
           "0.1, no attention-probability dropout on either side. Each side ran "
           f"{a.rounds} times per batch in alternating worker processes ({a.warmup} warm-up "
           f"+ {a.steps} timed steps each); ms/step is the median over all timed steps, "
           "the spread is (max - min) / median.",
           "",
           "| global batch | ours ms/step | PyTorch ms/step | ours pairs/s | PyTorch pairs/s "
           "| ours / PyTorch pairs/s | MFU ours / PyTorch | compile s ours | peak GiB ours "
           "/ PyTorch | spread ours / PyTorch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  batches = sorted({r["batch"] for r in rows})
  for b in batches:
    mine = [r for r in rows if r["batch"] == b and r["side"] == "ours" and not r["variant"]]
    ref = [r for r in rows if r["batch"] == b and r["side"] == "torch" and not r["variant"]]
    to, tt = _median_ms(mine), _median_ms(ref)
    if to is None or tt is None:
      status = "; ".join(sorted({r["status"] for r in mine + ref if r["status"] != "ok"}))
      lines.append(f"| {b} | {_fmt(to)} | {_fmt(tt)} | | | | | | | {status} |")
      continue
    mfu = lambda ms: (f"{100 * flops * b / (ms / 1e3) / (peak * 1e12):.0f}%"
                      if flops and peak else "n/a")
    gib = lambda rs: max((r["peak_bytes"] or 0) for r in rs if r["status"] == "ok") / 2**30
    sp = lambda rs: _spread([t for r in rs if r["status"] == "ok" for t in r["times"]])
    compile_s = next(r["compile_s"] for r in mine if r["status"] == "ok")
    lines.append(f"| {b} | {to:.1f} | {tt:.1f} | {b / to * 1e3:.0f} | {b / tt * 1e3:.0f} | "
                 f"**{tt / to:.2f}** | {mfu(to)} / {mfu(tt)} | {compile_s:.1f} | "
                 f"{gib(mine):.1f} / {gib(ref):.1f} | {sp(mine):.2f} / {sp(ref):.2f} |")
  extra = [r for r in rows if r["variant"]]
  if extra:
    lines += ["", f"Variants at batch {extra[0]['batch']} (one worker each; the headline "
              "rows' medians at that batch for reference):", "",
              "| variant | ms/step | pairs/s | compile s | peak GiB |", "|---|---|---|---|---|"]
    for r in extra:
      name = (("PyTorch, torch.compile" if r["side"] == "torch" else "ours, ")
              + ", ".join(f"{k}={v}" for k, v in r["variant"].items() if k != "compile"))
      if r["status"] != "ok":
        lines.append(f"| {name} | {r['status']} | | | |")
        continue
      ms = _median_ms([r])
      lines.append(f"| {name} | {ms:.1f} | {r['batch'] / ms * 1e3:.0f} | "
                   f"{_fmt(r['compile_s'])} | {(r['peak_bytes'] or 0) / 2**30:.1f} |")
  notes = []
  if ours_any:
    notes.append(f"ours ran {'cuDNN fused' if ours_any.get('fused_attention') else 'XLA'} "
                 f"attention; PyTorch's attention: '{torch_any.get('attention', '?')}'.")
  if flops:
    notes.append(f"model FLOPs per pair (training, padded shapes): {flops / 1e9:.4g} GFLOP;"
                 f" MFU against {peak or '?'} TFLOP/s bf16 dense.")
  notes.append(f"{wall:.0f} s in all.")
  return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.1f}"


def _spread(times: list[float]) -> float:
  return (max(times) - min(times)) / statistics.median(times) if times else float("nan")


def write_section(path: Path, md: str, section: str = SECTION) -> None:
  """Replaces (or appends) the section that starts with `section`, up to the next `## `."""
  text = path.read_text() if path.exists() else ""
  start = text.find(section)
  if start < 0:
    text = text.rstrip("\n") + "\n\n" + md + "\n"
  else:
    end = text.find("\n## ", start + len(section))
    text = text[:start] + md + "\n" + (text[end:] if end >= 0 else "")
  path.write_text(text)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--worker", choices=("ours", "torch"))
  ap.add_argument("--variant", default="{}")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--batches", default="256,1024")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--budget-s", type=float, default=420.0,
                  help="no optional measurement starts after this; workers are cut here")
  ap.add_argument("--worker-timeout-s", type=float, default=150.0,
                  help="a worker still running after this is cut")
  ap.add_argument("--peak-tflops", type=float, default=None)
  ap.add_argument("--out", default=None, help="folder for gpu_train.md/json (default $OUT)")
  ap.add_argument("--write-benchmarks", action="store_true",
                  help="also replace the section in BENCHMARKS.md")
  ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
  a, rest = ap.parse_known_args()
  if rest:
    ap.error(f"unknown arguments {rest}")
  a.passthrough = [x for x in sys.argv[1:]]
  if a.cpu_smoke:
    a.steps, a.warmup, a.rounds = 2, 1, 1
  if a.worker:
    worker(a)
  else:
    parent(a)


if __name__ == "__main__":
  main()
