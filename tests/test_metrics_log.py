"""The loop's metrics: metrics.jsonl and a TensorBoard event file that TensorBoard's own
reader reads back, written without importing TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from vldeformer_jax.metrics_log import MetricsLog


def test_event_file_holds_the_jsonl_scalars(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  log = MetricsLog(tmp_path, is_main=True)
  log.write(10, {"loss": 2.5, "lr": 1e-4})
  log.write(20, {"loss": 1.25, "eval/t2i_r1": 40.0})
  log.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 10, "loss": 2.5, "lr": 1e-4},
                  {"step": 20, "loss": 1.25, "eval/t2i_r1": 40.0}]
  [event_file] = tmp_path.glob("events.out.tfevents.*")
  events = EventAccumulator(str(event_file))
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["eval/t2i_r1", "loss", "lr"]
  for tag in ("loss", "lr", "eval/t2i_r1"):
    want = [(r["step"], r[tag]) for r in rows if tag in r]
    got = [(e.step, e.value) for e in events.Scalars(tag)]
    assert got == [(s, pytest.approx(v)) for s, v in want], tag


def test_only_the_main_process_writes_files(tmp_path):
  log = MetricsLog(tmp_path, is_main=False)
  log.write(1, {"loss": 1.0})
  log.close()
  assert list(tmp_path.iterdir()) == []


def test_the_loop_does_not_import_tensorflow(tmp_path):
  """Importing the trainer and writing metrics leaves TensorFlow (seconds of start-up
  on every bin/train) and clu out of the process."""
  code = ("import sys; from pathlib import Path\n"
          "import vldeformer_jax.train\n"
          "from vldeformer_jax.metrics_log import MetricsLog\n"
          f"log = MetricsLog(Path({str(tmp_path)!r}), True); log.write(1, {{'loss': 1.0}})\n"
          "log.close()\n"
          "print(sorted(m for m in ('tensorflow', 'clu', 'torch') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO, check=True)
  assert proc.stdout.strip() == "[]", proc.stdout
