"""plots.py and bin/plot: the PNGs are written, decode, and hold the logged points."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from conftest import run_bin
from vldeformer_jax import plots

RECALL = {k: 10.0 + i for i, k in enumerate(plots.RECALL_KEYS)}


def write_run(workdir: Path, train_steps: list[int], eval_steps: list[int],
              scale: float = 1.0) -> Path:
  """A metrics.jsonl as bin/train writes it: a row per logged step, an eval row after
  the training row of its step."""
  workdir.mkdir(parents=True)
  rows = []
  for step in train_steps:
    rows.append({"step": step, "loss": scale * 2.0 / step, "lr": 1e-4 * step,
                 "pairs_per_s": 10.0})
    if step in eval_steps:
      rows.append({"step": step, **{f"eval/{k}": scale * v + step
                                    for k, v in RECALL.items()}, "eval/rsum": 1.0})
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return workdir


def line(fig, gid: str):
  found = [l for ax in fig.axes for l in ax.get_lines() if l.get_gid() == gid]
  assert len(found) == 1, (gid, [l.get_gid() for ax in fig.axes for l in ax.get_lines()])
  return found[0]


def test_read_metrics_keeps_each_key_over_its_steps_and_the_last_row_of_a_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.0}\n'
                  '{"step": 20, "eval/i2t_r1": 5.0}\n\n'
                  # resumed from a checkpoint at step 10: step 20 logged again
                  '{"step": 20, "loss": 1.5}\n{"step": 30, "loss": 1.0}\n')
  curves = plots.read_metrics(path)
  assert curves["loss"] == ([10, 20, 30], [3.0, 1.5, 1.0])
  assert curves["eval/i2t_r1"] == ([20], [5.0])


@pytest.mark.parametrize("text, message", [
    ('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n', "line 2: not JSON"),
    ('{"loss": 1.0}\n', "line 1: not an object with an integer 'step'"),
    ('[1, 2]\n', "line 1: not an object with an integer 'step'"),
    ('{"step": 1, "loss": "high"}\n', "line 1: 'loss' is not a number"),
    ("\n", "no metrics logged yet"),
])
def test_read_metrics_names_file_and_line_of_a_bad_row(tmp_path, text, message):
  path = tmp_path / "metrics.jsonl"
  path.write_text(text)
  with pytest.raises(plots.PlotError, match=f"^{re.escape(str(path))}.*{re.escape(message)}"):
    plots.read_metrics(path)


def test_curves_png_has_a_point_per_logged_step_and_per_evaluation(tmp_path):
  train_steps, eval_steps = list(range(10, 101, 10)), [50, 100]
  workdirs = [write_run(tmp_path / "main", train_steps, eval_steps),
              write_run(tmp_path / "ablation", train_steps[:6], [50], scale=0.5)]
  labels = plots.run_labels(workdirs)
  assert labels == ["main", "ablation"]
  fig = plots.plot_curves({l: plots.read_run(w) for l, w in zip(labels, workdirs)})

  loss = line(fig, "main:loss")
  np.testing.assert_array_equal(loss.get_xdata(), train_steps)
  np.testing.assert_allclose(loss.get_ydata(), [2.0 / s for s in train_steps])
  np.testing.assert_array_equal(line(fig, "ablation:loss").get_xdata(), train_steps[:6])
  np.testing.assert_allclose(line(fig, "main:lr").get_ydata(),
                             [1e-4 * s for s in train_steps])
  for key, value in RECALL.items():
    main = line(fig, f"main:eval/{key}")
    np.testing.assert_array_equal(main.get_xdata(), eval_steps)
    np.testing.assert_allclose(main.get_ydata(), [value + s for s in eval_steps])
    ablation = line(fig, f"ablation:eval/{key}")
    np.testing.assert_array_equal(ablation.get_xdata(), [50])
  assert line(fig, "main:loss").get_color() != line(fig, "ablation:loss").get_color()
  # rsum, pairs_per_s and the rest are not drawn
  assert len([l for ax in fig.axes for l in ax.get_lines()]) == 2 * (2 + len(RECALL))

  png = plots.save(fig, tmp_path / "out" / "curves.png")
  image = matplotlib.image.imread(png)
  assert image.ndim == 3 and min(image.shape[:2]) > 300
  assert image[..., :3].std() > 0  # not a blank canvas


def test_run_labels_use_the_path_when_two_workdirs_share_a_name(tmp_path):
  assert plots.run_labels([tmp_path / "a" / "workdir", tmp_path / "b" / "workdir",
                           tmp_path / "c"]) == [
      str(tmp_path / "a" / "workdir"), str(tmp_path / "b" / "workdir"), "c"]


def test_recall_bars_png_has_a_bar_per_metric_for_each_result(tmp_path):
  results = {}
  for i, name in enumerate(["before", "after", "after, no hard negatives"]):
    path = tmp_path / f"eval_{i}.json"
    path.write_text(json.dumps({"protocol": "all", "individual": {
        **{k: v + 20 * i for k, v in RECALL.items()}, "rsum": 0.0, "seconds": 1.0}}))
    results[name] = plots.read_recall(path)
  fig = plots.plot_recall_bars(results)
  (ax,) = fig.axes
  assert [c.get_label() for c in ax.containers] == list(results)
  for i, container in enumerate(ax.containers):
    np.testing.assert_allclose([bar.get_height() for bar in container],
                               [RECALL[k] + 20 * i for k in plots.RECALL_KEYS])
  image = matplotlib.image.imread(plots.save(fig, tmp_path / "recall.png"))
  assert image.ndim == 3 and image[..., :3].std() > 0


def test_read_recall_rejects_a_file_without_individual_recall(tmp_path):
  path = tmp_path / "joint.json"
  path.write_text(json.dumps({"joint": RECALL}))
  with pytest.raises(plots.PlotError, match=f"^{re.escape(str(path))}: no individual R@K"):
    plots.read_recall(path)


def test_bin_plot_writes_both_pngs(tmp_path):
  workdir = write_run(tmp_path / "run", [10, 20, 30], [30])
  eval_json = tmp_path / "after.json"
  eval_json.write_text(json.dumps({"individual": RECALL}))
  proc = run_bin("plot", str(workdir), "--out", str(tmp_path / "c.png"), "--recall",
                 f"before={eval_json}", f"after={eval_json}",
                 "--recall_out", str(tmp_path / "r.png"))
  assert proc.stdout.split() == ["wrote", str(tmp_path / "c.png"),
                                 "wrote", str(tmp_path / "r.png")]
  for name in ("c.png", "r.png"):
    assert matplotlib.image.imread(tmp_path / name).ndim == 3


@pytest.mark.parametrize("case", ["malformed", "no_metrics", "no_workdir"])
def test_bin_plot_reports_a_bad_run_in_one_line(tmp_path, case):
  workdir = tmp_path / "run"
  if case == "malformed":
    write_run(workdir, [10, 20], [])
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write('{"step": 30, "loss": 1.0\n')
    expected = f"{workdir / 'metrics.jsonl'} line 3: not JSON"
  elif case == "no_metrics":
    workdir.mkdir()
    expected = f"{workdir / 'metrics.jsonl'}: no such file"
  else:
    expected = f"{workdir}: no such workdir"
  proc = run_bin("plot", str(workdir), "--out", str(tmp_path / "c.png"), check=False)
  assert proc.returncode == 1
  assert proc.stderr.startswith(f"bin/plot: error: {expected}")
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "c.png").exists()
