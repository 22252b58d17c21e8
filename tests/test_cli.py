"""A mistyped --config.KEY gets one line naming the key and the nearest valid ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vldeformer_jax.cli import config_override_error

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")


def test_config_override_error_names_the_key_and_the_nearest():
  assert config_override_error(["--config", DEMO, "--config.temperature=0.1",
                                "--config.model.hidden_size=8"]) is None
  msg = config_override_error([f"--config={DEMO}", "--config.temprature=0.1"])
  assert msg.startswith("--config.temprature: no such key in ")
  assert "did you mean --config.temperature" in msg
  msg = config_override_error([f"--config={DEMO}:no_negatives", "--config.model.hiden_size=8"])
  assert "--config.model.hidden_size" in msg
  msg = config_override_error([f"--config={DEMO}", "--config.zzzzzz=1"])
  assert "valid keys: " in msg and "temperature" in msg
  assert config_override_error(["--config=missing.py", "--config.x=1"]) is None


def test_bin_train_reports_a_mistyped_key_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "bin" / "train"), "--config", DEMO,
                         "--workdir", str(tmp_path), "--config.bogus=1"],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert "bin/train: error: --config.bogus: no such key in" in proc.stderr
  assert "Traceback" not in proc.stderr
