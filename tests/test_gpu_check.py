"""benchmarks/gpu_train_check.sh must run where only the GPU image's packages are: its
CPU smoke run, with ml_collections, clu, TensorFlow and NLTK made absent, times both
sides and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # both GPU scripts' CPU smoke runs, minutes

REPO = Path(__file__).resolve().parents[1]


def test_gpu_train_check_runs_with_only_the_gpu_image_modules(tmp_path):
  # The budget only caps a broken run: a slow CI host must not cut a worker that works.
  env = dict(os.environ, PYTHON=sys.executable,
             PYTHONPATH=str(REPO / "benchmarks" / "gpu_image"))
  proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_train_check.sh"),
                         "--cpu-smoke", "--budget-s", "400", "--out", str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=600)
  log = (tmp_path / "workers.log").read_text()
  assert proc.returncode == 0, proc.stderr[-3000:] + log[-3000:]
  # The step ran without them (no stand-ins: it imports none of them).
  assert "not installed here: ml_collections, clu" in log
  rows = json.loads((tmp_path / "gpu_train.json").read_text())
  assert {(r["side"], r["status"]) for r in rows} == {("ours", "ok"), ("torch", "ok")}
  assert all(len(r["times"]) == 2 and r["loss"] > 0 for r in rows)
  table = (tmp_path / "gpu_train.md").read_text()
  assert table.startswith("## Train step on a GPU: ours vs PyTorch")
  assert "| 8 |" in table


def test_gpu_worker_refuses_to_time_a_cpu_as_a_gpu():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_train_vs_torch.py"),
                         "--worker", "ours", "--batch", "2"], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0 and "no GPU backend" in proc.stderr


def test_gpu_speed_check_runs_with_only_the_gpu_image_modules(tmp_path):
  """The speed check at tiny sizes on CPU: the compiled query path, its bfloat16
  gallery with recall@10, and PyTorch, in the tables it writes."""
  env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO / "benchmarks" / "gpu_image"))
  proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_speed_check.sh"),
                         "--random", "minilm", "--sizes", "16", "--gallery_sizes", "300",
                         "--queries", "6", "--rounds", "2", "--max_encode", "16",
                         "--joint_batches", "1", "--batch_size", "8"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / "speed_gpu.json").read_text())["results"][0]
  single = result["single_query"][0]
  assert single["gallery"] == 300 and single["agreement"]["identical"] == 1.0
  assert {"ours", "ours_bfloat16", "torch"} <= set(single)
  assert 0.5 <= single["ours_bfloat16"]["recall_at_k"] <= 1.0
  table = (tmp_path / "speed_gpu.md").read_text()
  assert "| ours, bfloat16 gallery (recall@10 " in table and "| PyTorch |" in table
