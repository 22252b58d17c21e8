"""Pictures of training runs: the curves of `metrics.jsonl` and R@K bar charts.

`bin/plot` and `scripts/demo.sh` draw with these. Reading and drawing are separate: the
readers return plain dicts and fail with the file and line of a bad row; the drawers
take those dicts and return a matplotlib Figure (Agg backend, no display needed), which
`save` writes as PNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from vldeformer_jax import fileio

# (direction, K) as `evaluation` names them: i2t = image query -> captions.
DIRECTIONS = {"i2t": "image → text", "t2i": "text → image"}
KS = (1, 5, 10)
RECALL_KEYS = tuple(f"{d}_r{k}" for d in DIRECTIONS for k in KS)
_K_STYLE = {1: "-", 5: "--", 10: ":"}

# metric name -> (steps, values), steps increasing.
Curves = dict[str, tuple[list[int], list[float]]]


class PlotError(ValueError):
  """A run or result file that cannot be drawn; the message names the file (and line)."""


def read_metrics(path: str | os.PathLike) -> Curves:
  """Every metric of a `metrics.jsonl` as a curve over steps.

  A training row and an evaluation row share a step; each key is its own curve. A
  resumed run appends the steps after its checkpoint again: the later row wins.
  """
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except FileNotFoundError:
    raise PlotError(f"{path}: no such file (has the run logged a step yet?)") from None
  except (OSError, UnicodeDecodeError) as e:
    raise PlotError(f"{path}: cannot read: {e}") from None
  points: dict[str, dict[int, float]] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise PlotError(f"{path} line {number}: not JSON ({e.msg}): {line[:80]!r}") from None
    step = row.get("step") if isinstance(row, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
      raise PlotError(f"{path} line {number}: not an object with an integer 'step': "
                      f"{line[:80]!r}")
    for key, value in row.items():
      if key == "step":
        continue
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PlotError(f"{path} line {number}: {key!r} is not a number: {value!r}")
      points.setdefault(key, {})[step] = float(value)
  if not points:
    raise PlotError(f"{path}: no metrics logged yet")
  return {key: (sorted(by_step), [by_step[s] for s in sorted(by_step)])
          for key, by_step in points.items()}


def read_run(workdir: str | os.PathLike) -> Curves:
  """The curves of a `bin/train` workdir (its `metrics.jsonl`)."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise PlotError(f"{workdir}: no such workdir")
  return read_metrics(workdir / "metrics.jsonl")


def run_labels(workdirs: Sequence[str | os.PathLike]) -> list[str]:
  """Each workdir's name, or its path as given where two names are the same."""
  names = [Path(w).resolve().name for w in workdirs]
  return [name if names.count(name) == 1 else str(w) for name, w in zip(names, workdirs)]


def read_recall(path: str | os.PathLike) -> dict[str, float]:
  """The individual encoder's R@K of a `bin/eval --output` file."""
  path = Path(path)
  try:
    report = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise PlotError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PlotError(f"{path}: not a bin/eval --output JSON file: {e}") from None
  results = report.get("individual") if isinstance(report, dict) else None
  missing = [k for k in RECALL_KEYS
             if not isinstance(results, dict) or not isinstance(results.get(k), (int, float))]
  if missing:
    raise PlotError(f"{path}: no individual R@K ({', '.join(missing)}) in this file: is "
                    "it a bin/eval --output file of --mode individual?")
  return {k: float(results[k]) for k in RECALL_KEYS}


def plot_curves(runs: Mapping[str, Curves]) -> Any:
  """Loss, learning rate and R@K at each evaluation, one colour per run.

  Every curve's Line2D carries `gid` "RUN:METRIC" (METRIC: loss, lr, eval/i2t_r1, ...),
  so its points can be read back from the returned Figure.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  (ax_loss, ax_lr), recall_axes = axes[0], axes[1]
  for i, (run, curves) in enumerate(runs.items()):
    colour = f"C{i % 10}"
    for ax, key in ((ax_loss, "loss"), (ax_lr, "lr")):
      if key in curves:
        ax.plot(*curves[key], color=colour, lw=1.2, label=run, gid=f"{run}:{key}")
    for ax, direction in zip(recall_axes, DIRECTIONS):
      for k in KS:
        key = f"eval/{direction}_r{k}"
        if key in curves:
          ax.plot(*curves[key], _K_STYLE[k], marker="o", ms=4, color=colour,
                  gid=f"{run}:{key}")
  ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
  ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
  ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
  for ax in (ax_loss, ax_lr):
    ax.legend(fontsize=8)
  # R@K lines: their K by line style, their run by colour.
  k_legend = [Line2D([], [], color="black", ls=_K_STYLE[k], marker="o", ms=4,
                     label=f"R@{k}") for k in KS]
  if len(runs) > 1:
    k_legend += [Line2D([], [], color=f"C{i % 10}", lw=3, label=run)
                 for i, run in enumerate(runs)]
  for ax, (direction, words) in zip(recall_axes, DIRECTIONS.items()):
    ax.set(title=f"{words} ({direction}) at each evaluation", xlabel="step",
           ylabel="recall (%)", ylim=(0, 102))
    if ax.lines:
      ax.legend(handles=k_legend, fontsize=8, loc="best")
    else:
      ax.text(0.5, 0.5, "no evaluation logged", ha="center", va="center",
              transform=ax.transAxes, color="gray")
  for ax in axes.flat:
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  return fig


def plot_recall_bars(results: Mapping[str, Mapping[str, float]],
                     spread: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
                     title: str = "R@K on the evaluation split") -> Any:
  """R@K of several results side by side (e.g. before / after / after without hard
  negatives): one group of bars per metric, one bar per result, its value on it.
  `spread` (optional, per result and metric: (least, largest), e.g. over seeds) draws
  each bar's range as an error bar; a result missing from it gets none.

  Each result's BarContainer is labelled with its name (`ax.containers`)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  many = len(results) > 4  # narrow bars: values written upright inside them
  wide = 0.3 * len(RECALL_KEYS) * len(results) + 2.0 if many else 0.0
  fig, ax = plt.subplots(figsize=(max(1.6 * len(RECALL_KEYS), wide), 4.4))
  width = 0.8 / max(len(results), 1)
  for i, (name, recall) in enumerate(results.items()):
    xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(RECALL_KEYS))]
    heights = [recall[k] for k in RECALL_KEYS]
    yerr = None
    if spread is not None and name in spread:
      lo_hi = [spread[name][k] for k in RECALL_KEYS]
      yerr = [[h - lo for h, (lo, _) in zip(heights, lo_hi)],
              [hi - h for h, (_, hi) in zip(heights, lo_hi)]]
    bars = ax.bar(xs, heights, width, label=name, color=f"C{i % 10}", yerr=yerr,
                  capsize=2 if yerr else 0, error_kw=dict(lw=0.8))
    if many:
      ax.bar_label(bars, fmt="%.1f", fontsize=6, label_type="center", rotation=90,
                   color="white")
    else:
      ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
  ax.set_xticks(range(len(RECALL_KEYS)))
  ax.set_xticklabels([f"{DIRECTIONS[k[:3]]}\nR@{k[5:]}" for k in RECALL_KEYS], fontsize=8)
  ax.set(ylabel="recall (%)", ylim=(0, 110), title=title)
  if many:  # below the axes, clear of the bars
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=min(len(results), 4))
  else:
    ax.legend(fontsize=8, loc="upper left")
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  return fig


def save(fig: Any, path: str | os.PathLike, dpi: int = 110, tool: str = "bin/plot"
         ) -> Path:
  """Writes `fig` as PNG (creating the folder; atomically), marked as `tool`'s output
  (`fileio.is_generated`), and frees it."""
  import matplotlib.pyplot as plt
  with fileio.atomic_file(path) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png",
                metadata={"Software": fileio.generator(tool)})
  plt.close(fig)
  return Path(path)
