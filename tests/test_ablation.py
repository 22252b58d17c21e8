"""bin/ablate (ablation.py): the rows of Table 5 over seeds, each run resumable and
failing alone, tabulated with mean and range beside the paper's figures.

The fast tests stand a recording stub in for the bin/train and bin/eval child processes;
the slow one runs the real command twice on a tiny config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from conftest import FEW_STEPS_ENV, REPO, TINY_FEATURE_DIM, demo_data, run_bin
from vldeformer_jax import ablation
from vldeformer_jax.cli import ablate as cli
from vldeformer_jax.evaluation import METRIC_KEYS

DEMO = str(REPO / "configs" / "demo.py")
OVERRIDES = ["--config.data_dir=/nowhere/data", "--config.init_model=/nowhere/model"]
ROWS = {r.name: r for r in ablation.TABLE5_ROWS}
# The stub's R@1 of each row (seed s adds s): the rows' order differs from Table 5's.
R1 = {"vldeformer": 50.0, "no_avg_pool": 40.0, "no_pretrain": 30.0, "no_decompose": 10.0,
      "no_hard_negatives": 55.0}


class Stub:
  """bin/train and bin/eval as `ablation.run_tool` calls them: records each call;
  train writes a metrics.jsonl that reached the last step (or fails for a --config
  spec in `fail`), eval writes R@K from R1."""

  def __init__(self, fail: tuple[str, ...] = ()):
    self.calls: list[tuple[str, str]] = []
    self.fail = fail

  def __call__(self, tool: str, args, log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    if tool == "train":
      spec = args[args.index("--config") + 1]
      self.calls.append(("train", spec))
      if any(f in spec for f in self.fail):
        log.write_text("Traceback ...\nbin/train: error: out of memory\n")
        return 1
      workdir = Path(args[args.index("--workdir") + 1])
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "metrics.jsonl").write_text('{"step": 150, "loss": 1.0}\n')
      return 0
    model = args[args.index("--model") + 1]
    self.calls.append(("eval", model))
    trained = re.search(r"runs/(\w+)/seed(\d+)/workdir/model$", model)
    r1 = (R1[trained.group(1)] + int(trained.group(2)) if trained
          else R1["no_decompose"])
    metrics = {k: min(100.0, r1 + (0 if k.endswith("r1") else 30)) for k in METRIC_KEYS}
    metrics["rsum"] = sum(v for k, v in metrics.items() if k != "rsum")
    Path(args[args.index("--output") + 1]).write_text(
        json.dumps({"individual": metrics}))
    return 0


def run(out: Path, rows=("vldeformer", "no_avg_pool", "no_decompose"), seeds=2,
        stub: Stub | None = None, overrides=OVERRIDES) -> dict:
  """ablation.ablate on configs/demo.py with `rows` (names or Rows), the stub's tools."""
  rows = [ROWS[r] if isinstance(r, str) else r for r in rows]
  return ablation.ablate(DEMO, overrides, rows, range(seeds), out, tool=stub,
                         progress=False)


def test_rows_are_table5s_with_the_papers_figures():
  assert ablation.ROW_NAMES == ("vldeformer", "no_contrastive", "no_avg_pool",
                                "no_pretrain", "no_decompose", "no_hard_negatives")
  variants = {r.name: r.variant for r in ablation.TABLE5_ROWS}
  assert variants == {"vldeformer": "", "no_contrastive": "cosine", "no_avg_pool": "cls",
                      "no_pretrain": "random_init", "no_decompose": None,
                      "no_hard_negatives": "no_negatives"}
  assert ROWS["vldeformer"].paper_metrics()["rsum"] == pytest.approx(557.3)
  assert ROWS["no_decompose"].paper_metrics()["i2t_r1"] == 0.3
  assert ROWS["no_hard_negatives"].paper is None  # not a row of the paper
  assert ablation.row_spec("c.py", ROWS["no_avg_pool"], 2) == "c.py:cls,seed=2"
  assert ablation.row_spec("c.py:released", ROWS["vldeformer"], 0) == "c.py:released,seed=0"
  assert ablation.variant_changes("random_init,temperature=0.1") == {
      "init_random": True, "freeze_pretrained_steps": 0, "temperature": 0.1}


def test_runs_every_row_and_seed_once_and_resumes_without_rerunning(tmp_path):
  stub = Stub()
  result = run(tmp_path, stub=stub)
  assert not result["failed"]
  # The untrained row once, then seed by seed; each trained run: train, then eval.
  assert stub.calls[0] == ("eval", "/nowhere/model")
  assert [c[1] for c in stub.calls if c[0] == "train"] == [
      f"{DEMO}:seed=0", f"{DEMO}:cls,seed=0", f"{DEMO}:seed=1", f"{DEMO}:cls,seed=1"]
  assert len(stub.calls) == 1 + 4 * 2
  assert sorted(p.name for p in result["paths"]) == ["table5.json", "table5.md",
                                                     "table5.png"]
  table = json.loads((tmp_path / "table5.json").read_text())
  rows = {r["name"]: r for r in table["rows"]}
  assert list(rows) == ["vldeformer", "no_avg_pool", "no_decompose"]
  assert rows["vldeformer"]["seeds"] == [0, 1]
  assert rows["vldeformer"]["mean"]["i2t_r1"] == 50.5
  assert (rows["vldeformer"]["min"]["i2t_r1"], rows["vldeformer"]["max"]["i2t_r1"]) == (
      50.0, 51.0)
  assert rows["vldeformer"]["std"]["i2t_r1"] == pytest.approx(np.std([50, 51], ddof=1))
  assert list(rows["no_decompose"]["runs"]) == ["init"]
  assert rows["no_avg_pool"]["paper"]["i2t_r1"] == 83.0
  assert rows["no_avg_pool"]["holds"] == "yes" and rows["no_decompose"]["holds"] == "yes"
  md = (tmp_path / "table5.md").read_text()
  assert md.startswith("# Table 5 (the paper's ablation), reproduced\n")
  assert "| VLDeformer | 0, 1 | 50.5 [50.0–51.0] |" in md
  assert "| *paper, COCO 1k* | | *89.2* |" in md
  assert "w/o avg pool ([CLS])" in md and "Failed runs" not in md
  image = matplotlib.image.imread(tmp_path / "table5.png")
  assert image.ndim == 3 and image[..., :3].std() > 0

  again = Stub()
  run(tmp_path, stub=again)
  assert again.calls == []  # nothing trained or evaluated again
  # A new seed runs only what it adds.
  run(tmp_path, seeds=3, stub=again)
  assert [c[1] for c in again.calls if c[0] == "train"] == [
      f"{DEMO}:seed=2", f"{DEMO}:cls,seed=2"]
  # Only rows of this project's own (a sweep): not titled as the paper's table.
  run(tmp_path / "sweep", rows=(ablation.extra_row("tau_0.1=temperature=0.1"),),
      seeds=1, stub=Stub())
  assert (tmp_path / "sweep" / "table5.md").read_text().startswith(
      "# bin/ablate: tau_0.1\n")


def test_a_failed_run_is_named_and_the_others_are_kept(tmp_path):
  stub = Stub(fail=("cls,seed=1",))
  result = run(tmp_path, stub=stub)
  assert list(result["failed"]) == ["no_avg_pool seed 1"]
  assert "bin/train exited 1: bin/train: error: out of memory" in (
      result["failed"]["no_avg_pool seed 1"])
  rows = {r["name"]: r for r in json.loads((tmp_path / "table5.json").read_text())["rows"]}
  assert rows["no_avg_pool"]["seeds"] == [0] and rows["vldeformer"]["seeds"] == [0, 1]
  assert list(rows["no_avg_pool"]["failed"]) == ["no_avg_pool seed 1"]
  md = (tmp_path / "table5.md").read_text()
  assert "## Failed runs" in md and "**no_avg_pool seed 1**" in md
  # Rerun: only the failed run trains again.
  retry = Stub()
  assert not run(tmp_path, stub=retry)["failed"]
  assert retry.calls == [("train", f"{DEMO}:cls,seed=1"),
                         ("eval", str(tmp_path / "runs/no_avg_pool/seed1/workdir/model"))]


def test_a_run_that_stopped_early_is_not_evaluated(tmp_path):
  """bin/train exits 0 after SIGTERM short of total_steps: the run is not finished."""
  def stopped(tool, args, log):
    if tool == "train":
      workdir = Path(args[args.index("--workdir") + 1])
      workdir.mkdir(parents=True)
      (workdir / "metrics.jsonl").write_text(
          '{"step": 40, "loss": 1.0}\n')
      return 0
    raise AssertionError("evaluated an unfinished run")
  result = ablation.ablate(DEMO, OVERRIDES, [ROWS["vldeformer"]], [0], tmp_path,
                           tool=stopped, progress=False)
  assert "stopped at step 40 of 150" in result["failed"]["vldeformer seed 0"]


def test_settings_no_run_can_use_are_refused_before_anything_runs(tmp_path):
  stub = Stub()
  run(tmp_path, rows=("vldeformer",), seeds=1, stub=stub)
  with pytest.raises(ValueError, match="was run with --config.init_model=/nowhere/model "
                                       "where this asks for --config.init_model=/else"):
    run(tmp_path, rows=("vldeformer",), seeds=1, stub=stub,
        overrides=[OVERRIDES[0], "--config.init_model=/else"])
  with pytest.raises(ValueError, match="seeds come from --seeds"):
    run(tmp_path / "b", overrides=[*OVERRIDES, "--config.seed=3"])
  with pytest.raises(ValueError, match="row no_avg_pool sets pooling='cls', which "
                                       "--config.pooling='mean' undoes"):
    run(tmp_path / "c", overrides=[*OVERRIDES, "--config.pooling=mean"])
  # An override a row sets to the same value is fine; a row whose config cannot train
  # fails alone, by name, without a child process.
  bad = ablation.extra_row("unmasked=pooling=mean_unmasked")
  other = Stub()
  result = run(tmp_path / "d", rows=("no_pretrain", bad), seeds=1, stub=other,
               overrides=[*OVERRIDES, "--config.freeze_pretrained_steps=0"])
  assert list(result["failed"]) == ["unmasked seed 0"]
  assert "invalid config: --config.pooling='mean_unmasked'" in (
      result["failed"]["unmasked seed 0"])
  assert other.calls == [("train", f"{DEMO}:random_init,seed=0"),
                         ("eval", str(tmp_path / "d/runs/no_pretrain/seed0/workdir/model"))]


def test_direction_needs_every_seed_below_for_yes():
  ref = {"runs": {"0": 1, "1": 1}, "min": {"rsum": 400.0}, "mean": {"rsum": 410.0}}
  row = lambda lo, mean, hi: {"runs": {"0": 1}, "max": {"rsum": hi},
                              "mean": {"rsum": mean}, "min": {"rsum": lo}}
  assert ablation.direction(row(300, 350, 399), ref) == "yes"
  assert ablation.direction(row(300, 405, 420), ref) == "on the mean only"
  assert ablation.direction(row(400, 415, 430), ref) == "no"
  assert ablation.direction({"runs": {}}, ref) == ""


def test_cli_flags(tmp_path, monkeypatch, capsys):
  stub = Stub()
  monkeypatch.setattr(ablation, "run_tool", stub)
  assert cli.main(["--config", DEMO, "--out", str(tmp_path), "--seeds", "1",
                   "--rows", "vldeformer", "--extra_row", "tau_0.1=temperature=0.1",
                   *OVERRIDES]) == 0
  assert [c[1] for c in stub.calls if c[0] == "train"] == [f"{DEMO}:seed=0"]
  # Extra rows join the default rows.
  assert cli.main(["--config", DEMO, "--out", str(tmp_path), "--seeds", "1", "--rows",
                   "vldeformer,tau_0.1", "--extra_row", "tau_0.1=temperature=0.1",
                   "--name", "sweep", *OVERRIDES]) == 0
  assert stub.calls[-2] == ("train", f"{DEMO}:temperature=0.1,seed=0")
  assert (tmp_path / "sweep.md").is_file()
  out = capsys.readouterr().out
  assert f"wrote {tmp_path / 'sweep.md'}" in out
  for bad, message in ((["--rows", "nope"], "unknown row nope"),
                       (["--extra_row", "no_avg_pool=cls"], "a row of Table 5 already"),
                       (["--config.bogus=1"], "--config.bogus: no such key"),
                       (["stray"], "unrecognized arguments: stray"),
                       (["--seeds", "0"], "--seeds must be >= 1")):
    with pytest.raises(SystemExit) as e:
      cli.main(["--config", DEMO, "--out", str(tmp_path / "x"), *OVERRIDES, *bad])
    assert e.value.code == 2 and message in capsys.readouterr().err
  assert cli.main(["--config", DEMO, "--out", str(tmp_path / "y"), *OVERRIDES,
                   "--config.seed=1"]) == 2
  assert "bin/ablate: error: --config.seed" in capsys.readouterr().err
  monkeypatch.setattr(ablation, "run_tool", Stub(fail=("seed=0",)))
  assert cli.main(["--config", DEMO, "--out", str(tmp_path / "z"), "--seeds", "1",
                   "--rows", "vldeformer", *OVERRIDES]) == 1
  assert "1 run(s) failed: vldeformer seed 0" in capsys.readouterr().err


@pytest.mark.slow
def test_bin_ablate_on_a_tiny_config_writes_the_tables_and_resumes(tmp_path,
                                                                  tiny_model_dir):
  """The real command: 2 rows x 2 seeds of a few steps through bin/train and bin/eval,
  then again: nothing is trained again, the tables are rewritten."""
  demo_data(tmp_path / "data")
  out = tmp_path / "out"
  args = ["--config", DEMO, "--seeds", "2", "--out", str(out),
          "--rows", "vldeformer,no_contrastive",
          f"--config.data_dir={tmp_path / 'data'}", f"--config.init_model={tiny_model_dir}",
          f"--config.feature_dim={TINY_FEATURE_DIM}", "--config.max_text_len=24",
          "--config.max_tag_len=12", "--config.max_joint_len=24", "--config.max_regions=8",
          "--config.batch_size=8", "--config.total_steps=2", "--config.warmup_steps=1",
          "--config.log_every_steps=1", "--config.eval_every_steps=0",
          "--config.checkpoint_every_steps=2", "--config.freeze_pretrained_steps=0",
          "--config.pipeline_workers=1", "--config.prepare_workers=0"]
  proc = run_bin("ablate", *args, env=FEW_STEPS_ENV)
  for name in ("table5.md", "table5.json", "table5.png"):
    assert f"wrote {out / name}" in proc.stdout
  table = json.loads((out / "table5.json").read_text())
  assert [(r["name"], r["seeds"]) for r in table["rows"]] == [
      ("vldeformer", [0, 1]), ("no_contrastive", [0, 1])]
  assert all(np.isfinite(r["mean"]["rsum"]) for r in table["rows"])
  config = json.loads((out / "runs/no_contrastive/seed1/workdir/config.json").read_text())
  assert config["loss"] == "cosine" and config["seed"] == 1
  md = (out / "table5.md").read_text()
  assert "| w/o contrastive (pairwise cosine) | 0, 1 |" in md
  logs = {p: p.read_text() for p in out.glob("runs/*/seed*/*.log")}
  assert len(logs) == 8
  proc = run_bin("ablate", *args, env=FEW_STEPS_ENV)
  assert f"wrote {out / 'table5.md'}" in proc.stdout
  assert {p: p.read_text() for p in out.glob("runs/*/seed*/*.log")} == logs


def test_the_parent_never_starts_a_jax_backend(tmp_path):
  """bin/ablate plans, checks and tabulates without a device, so on an accelerator the
  bin/train children get all of its memory."""
  import subprocess
  import sys
  code = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from pathlib import Path
from jax._src import xla_bridge
from vldeformer_jax import ablation
from test_ablation import DEMO, OVERRIDES, ROWS, Stub
ablation.ablate(DEMO, OVERRIDES, [ROWS["vldeformer"], ROWS["no_decompose"]], [0],
                Path({str(tmp_path)!r}), tool=Stub(), progress=False)
assert (Path({str(tmp_path)!r}) / "table5.png").is_file()
print("backends:", sorted(xla_bridge._backends))
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "backends: []" in proc.stdout
