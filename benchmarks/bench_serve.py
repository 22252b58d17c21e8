#!/usr/bin/env python
"""Load test of `bin/serve` on loopback: latency and throughput at 1, 8 and 32 clients.

Starts `bin/serve` on a synthetic index (random unit image embeddings; the cost of a
query does not depend on what is embedded) with a model directory or random weights at
MiniLM / BERT-base size, then, for each concurrency C, runs C clients that each send
text -> image requests (`k` results, distinct COCO-like captions) back to back, one
at a time, over keep-alive connections. Each level first runs `--warmup` requests
(not recorded: they compile the batch shapes the service had not yet seen), then
stops at `--requests` answers or `--max-seconds`, whichever comes first. Reports per
level p50 / p99 latency, queries/s and how many requests the service batched per device
call (from /api/health).

  .venv/bin/python benchmarks/bench_serve.py --images 100000 --write   # BENCHMARKS.md
  .venv/bin/python benchmarks/bench_serve.py --quick                  # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import write_section  # noqa: E402
from vldeformer_jax import retrieval, speed  # noqa: E402
from vldeformer_jax.config import MODEL_SIZES  # noqa: E402
from vldeformer_jax.model_dir import random_model_dir  # noqa: E402


def synthetic_index(model_dir: Path, num_images: int, hidden: int, out: Path) -> Path:
  """An index of `num_images` random unit embeddings with VinVL-like tags."""
  gallery = speed.random_gallery(num_images, hidden, seed=1)
  tags = speed.synthetic_images(num_images, 8, num_regions=8).tags
  index = retrieval.RetrievalIndex(
      gallery, np.ones(num_images, np.float32), [str(i) for i in range(num_images)], tags,
      metadata={"model_dir": str(model_dir.resolve()), "split": "synthetic"})
  return retrieval.save_index(index, out)


def start_server(index: Path, max_batch: int, gallery_dtype: str, log: Path
                 ) -> tuple[subprocess.Popen, str]:
  proc = subprocess.Popen(
      [sys.executable, str(REPO / "bin" / "serve"), "--index", str(index), "--port", "0",
       "--no_data", "--max_batch", str(max_batch), "--gallery_dtype", gallery_dtype],
      stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  line = proc.stdout.readline()
  if not line.startswith("serving on "):
    proc.wait()
    raise SystemExit(f"bin/serve did not start:\n{log.read_text()[-3000:]}")
  return proc, line.split()[-1]


async def run_level(url: str, clients: int, queries: list[str], k: int, warmup: int,
                    requests: int, max_seconds: float) -> dict:
  """C clients back to back; latencies of the requests after the warm-up."""
  async with aiohttp.ClientSession(
      connector=aiohttp.TCPConnector(limit=clients)) as session:

    async def health() -> dict:
      async with session.get(f"{url}/api/health") as r:
        return (await r.json())["batches"]["text"]

    async def one(i: int) -> float:
      body = {"query": queries[i % len(queries)], "k": k}
      t0 = time.perf_counter()
      async with session.post(f"{url}/api/search/text", json=body) as r:
        answer = await r.json()
        if r.status != 200 or len(answer["results"]) != k:
          raise RuntimeError(f"bad answer {r.status}: {answer}")
      return time.perf_counter() - t0

    async def phase(count: int, seconds: float) -> tuple[list[float], float]:
      latencies: list[float] = []
      start = time.perf_counter()
      counter = iter(range(count))

      async def client() -> None:
        for i in counter:
          if time.perf_counter() - start > seconds:
            return
          latencies.append(await one(i))

      await asyncio.gather(*(client() for _ in range(clients)))
      return latencies, time.perf_counter() - start

    await phase(warmup, max_seconds)
    before = await health()
    latencies, elapsed = await phase(requests, max_seconds)
    after = await health()
  ms = np.asarray(latencies) * 1e3
  calls = after["calls"] - before["calls"]
  return {"clients": clients, "requests": len(ms), "seconds": elapsed,
          "qps": len(ms) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
          "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
          "per_call": (after["items"] - before["items"]) / max(calls, 1)}


def table(rows: list[dict]) -> str:
  out = ["| clients | requests | p50 ms | p99 ms | queries/s | requests per device call |",
         "|---|---|---|---|---|---|"]
  out += [f"| {r['clients']} | {r['requests']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
          f"{r['qps']:.1f} | {r['per_call']:.1f} |" for r in rows]
  return "\n".join(out)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", help="a model directory (default: random weights)")
  ap.add_argument("--random", choices=sorted(MODEL_SIZES), default="minilm")
  ap.add_argument("--images", type=int, default=100_000, help="gallery size")
  ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
  ap.add_argument("-k", type=int, default=10)
  ap.add_argument("--requests", type=int, default=2000, help="recorded, per level")
  ap.add_argument("--warmup", type=int, default=200, help="unrecorded, per level")
  ap.add_argument("--max-seconds", type=float, default=30.0,
                  help="cap on each phase (warm-up, recorded) per level")
  ap.add_argument("--max-batch", type=int, default=32, help="bin/serve --max_batch")
  ap.add_argument("--gallery-dtype", default="float32",
                  choices=retrieval.GALLERY_DTYPES)
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: 2,000 images, 40 requests per level, no writing")
  ap.add_argument("--json", help="write the measurements here")
  ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
  args = ap.parse_args()
  if args.quick:
    args.images, args.requests, args.warmup, args.max_seconds = 2000, 40, 20, 10.0
  levels = [int(c) for c in args.clients.split(",")]
  load0 = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
    tmp = Path(tmp)
    if args.model:
      model_dir, label = Path(args.model), f"{Path(args.model).name} (model dir)"
    else:
      vocab, _ = speed.default_vocab(tmp)
      model_dir = random_model_dir(args.random, tmp / "model", vocab_file=vocab)
      label = speed.MODEL_LABELS[args.random]
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    index = synthetic_index(model_dir, args.images, hidden, tmp / "bench.index")
    t0 = time.perf_counter()
    proc, url = start_server(index, args.max_batch, args.gallery_dtype, tmp / "serve.log")
    print(f"{label}, {args.images:,} images ({args.gallery_dtype}): serving on {url} "
          f"after {time.perf_counter() - t0:.1f} s (load, warm-up)", flush=True)
    queries = speed.synthetic_captions(5000, seed=11)
    rows = []
    try:
      for clients in levels:
        row = asyncio.run(run_level(url, clients, queries, args.k, args.warmup,
                                    args.requests, args.max_seconds))
        print(f"  {clients:>3} clients: {row['requests']} requests, p50 "
              f"{row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, {row['qps']:.1f} "
              f"queries/s, {row['per_call']:.1f} per device call", flush=True)
        rows.append(row)
    finally:
      proc.terminate()
      proc.wait()
  load = (load0[0], os.getloadavg()[0])
  print(table(rows))
  print(f"load average {load[0]:.2f} -> {load[1]:.2f}")
  meta = {"model": label, "images": args.images, "k": args.k,
          "gallery_dtype": args.gallery_dtype, "max_batch": args.max_batch,
          "load": load, "levels": rows}
  if args.json:
    Path(args.json).write_text(json.dumps(meta, indent=2) + "\n")
  if args.write:
    body = (f"{label}, {args.images:,} random unit image embeddings "
            f"({args.gallery_dtype}), k = {args.k}, `bin/serve --max_batch "
            f"{args.max_batch}` on loopback; each client sends one text query at a time "
            f"(distinct captions); {args.warmup} unrecorded requests per level first, "
            f"then at most {args.requests} requests or {args.max_seconds:.0f} s. "
            f"Load average {load[0]:.2f} before, {load[1]:.2f} after.\n\n" + table(rows))
    write_section("serve", "Serving: bin/serve under load on loopback", body)
    print("wrote the 'serve' section of BENCHMARKS.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
