"""The paper's ablation (Table 5), reproduced over seeds on any config: `bin/ablate`.

Table 5 (COCO 1k) has five rows: VLDeformer; w/o contrastive (the pairwise cosine
objective); w/o avg pool ([CLS]); w/o pre-train (random init); w/o decompose (the
pre-trained model used as an individual encoder, not trained). Each trained row is a
named variant of `config.VARIANTS` applied to the given config; "w/o decompose" is the
config's `init_model` evaluated as it is. This project adds one row the paper does not
have: the recipe without the bimodal hard negatives.

Each (row, seed) trains in a `bin/train` subprocess of its own (`--config FILE:ARG` with
the row's variant and `seed=N`, the user's `--config.KEY=VALUE` overrides passed on), so
a crash or an out-of-memory in one row cannot take the others down, and a killed run
resumes from its checkpoints; then `bin/eval` (a subprocess too: the parent never holds
an accelerator) writes its R@K. A run whose results exist is not run again; one that
was run with other settings is refused, naming it. The mean and spread over seeds of
each row go to `NAME.md`, `NAME.json` and `NAME.png` (default NAME: table5) after
every run, so a long ablation shows its partial table as it goes.

Layout of `--out DIR`: `DIR/runs/ROW/seedN/` (`workdir/`: bin/train's, which holds only
what bin/train writes, as bin/train requires; `train.log`, `eval.log`, `eval.json` and
`run.json`: the run's settings and times),
`DIR/runs/no_decompose/` (evaluated once: the same model for every seed).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from vldeformer_jax import config as config_lib
from vldeformer_jax.evaluation import METRIC_KEYS

RECALL_KEYS = METRIC_KEYS[:6]  # i2t R@1/5/10, t2i R@1/5/10 (then rsum)


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the ablation table."""
  name: str                 # its folder under runs/ and its name for --rows
  label: str                # as the table shows it
  variant: str | None       # `config.apply_variants` text; None: not trained (the
                            # config's init model evaluated as it is)
  paper: tuple[float, ...] | None = None  # Table 5, COCO 1k: RECALL_KEYS; None: not
                                          # a row of the paper

  @property
  def trained(self) -> bool:
    return self.variant is not None

  def paper_metrics(self) -> dict[str, float] | None:
    if self.paper is None:
      return None
    out = dict(zip(RECALL_KEYS, self.paper))
    return {**out, "rsum": round(sum(self.paper), 1)}


# The paper's Table 5 (COCO 1k test, VinVL-base), in its order, then this project's row.
TABLE5_ROWS: tuple[Row, ...] = (
    Row("vldeformer", "VLDeformer", "", (89.2, 98.9, 99.9, 75.9, 95.4, 98.0)),
    Row("no_contrastive", "w/o contrastive (pairwise cosine)", "cosine",
        (72.5, 95.8, 99.0, 60.7, 90.2, 96.2)),
    Row("no_avg_pool", "w/o avg pool ([CLS])", "cls",
        (83.0, 95.3, 96.6, 69.7, 87.8, 90.4)),
    Row("no_pretrain", "w/o pre-train (random init)", "random_init",
        (81.5, 97.3, 98.8, 64.8, 91.6, 95.9)),
    Row("no_decompose", "w/o decompose (the init model, not trained)", None,
        (0.3, 1.0, 2.0, 0.1, 0.2, 1.6)),
    Row("no_hard_negatives", "w/o hard negatives (not in the paper)", "no_negatives"),
)
ROW_NAMES = tuple(r.name for r in TABLE5_ROWS)
REFERENCE_ROW = "vldeformer"  # what the other rows are compared with
_ROW_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# A bin/ tool's main() in a child process: importable from a fresh clone or an install
# alike (the parent puts this package's folder on the child's PYTHONPATH).
_CHILD = "import sys; from vldeformer_jax.cli.{tool} import main; sys.exit(main())"


def extra_row(spec: str) -> Row:
  """`NAME=VARIANTS` (e.g. `tau_0.1=temperature=0.1`) -> a trained row of this project."""
  name, sep, variant = spec.partition("=")
  if not sep or not _ROW_NAME.match(name) or not variant.strip():
    raise ValueError(f"--extra_row {spec!r}: expected NAME=VARIANTS, NAME of letters, "
                     "digits, '_', '.', '-' (e.g. tau_0.1=temperature=0.1)")
  if name in ROW_NAMES:
    raise ValueError(f"--extra_row {spec!r}: {name!r} is a row of Table 5 already")
  return Row(name, f"{name}: {variant}", variant)


def variant_changes(variant: str) -> dict[str, Any]:
  """The keys a variant text sets, with their values (applied to `config.defaults()`)."""
  class Recorder(dict):
    def __init__(self, base: dict):
      super().__init__(base)
      self.changed: dict[str, Any] = {}

    def __setitem__(self, key, value):
      super().__setitem__(key, value)
      self.changed[key] = value

  recorder = Recorder(config_lib.defaults())
  config_lib.apply_variants(recorder, variant)
  return recorder.changed


def override_keys(overrides: Sequence[str]) -> list[str]:
  """KEY of each `--config.KEY=VALUE` (or `--config.KEY VALUE`)."""
  return [o[len("--config."):].split("=", 1)[0] for o in overrides
          if o.startswith("--config.")]


def load_config(spec: str, overrides: Sequence[str]) -> Any:
  """The ConfigDict `bin/train --config SPEC OVERRIDES...` would train with."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  argv = ["bin/ablate", "--config", spec, *overrides]
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise ValueError(f"--config {spec}: {e}") from None
  return holder.value


def row_spec(config_spec: str, row: Row, seed: int) -> str:
  """`FILE:ARG` for one run: the user's ARG, the row's variant and `seed=N`."""
  path, _, arg = config_spec.partition(":")
  return f"{path}:" + ",".join(p for p in (arg, row.variant, f"seed={seed}") if p)


# ------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Run:
  """One (row, seed), or the untrained row's single evaluation (seed None)."""
  row: Row
  seed: int | None
  folder: Path
  train_args: list[str]     # bin/train's flags, without --workdir
  eval_args: list[str]      # bin/eval's flags, without --output
  total_steps: int = 0
  error: str | None = None  # why it cannot run (its config is invalid)

  @property
  def name(self) -> str:
    return self.row.name if self.seed is None else f"{self.row.name} seed {self.seed}"

  @property
  def workdir(self) -> Path:
    """bin/train's workdir (its own folder: bin/train refuses one holding other files)."""
    return self.folder / "workdir"

  @property
  def eval_json(self) -> Path:
    return self.folder / "eval.json"

  @property
  def record_path(self) -> Path:
    return self.folder / "run.json"

  def record(self) -> dict:
    try:
      return json.loads(self.record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
      return {}

  def write_record(self, **changes: Any) -> None:
    _write_text(self.record_path, json.dumps({**self.record(), **changes}, indent=2) + "\n")

  def conflict(self) -> str | None:
    """Why this run's folder cannot be resumed: it was trained with other settings."""
    old = self.record().get("train_args")
    if old is None or old == self.train_args:
      return None
    was = [a for a in old if a not in self.train_args] or ["(nothing)"]
    now = [a for a in self.train_args if a not in old] or ["(nothing)"]
    return (f"{self.folder} was run with {' '.join(was)} where this asks for "
            f"{' '.join(now)}: use another --out")

  def status(self) -> str:
    """'done' (evaluated with these settings), 'evaluate' (trained) or 'train'."""
    record = self.record()
    trained = not self.row.trained or record.get("train_s") is not None
    if not trained:
      return "train"
    if record.get("eval_args") == self.eval_args and self.eval_json.is_file():
      return "done"
    return "evaluate"


def plan_runs(config_spec: str, overrides: Sequence[str], rows: Sequence[Row],
              seeds: Sequence[int], out: Path, split: str | None = None,
              protocol: str | None = None) -> tuple[list[Run], dict[str, str]]:
  """Every run of the ablation, seed by seed (a first pass gives every row once), and
  the evaluation's split and protocol (default: the config's `eval_split`,
  `eval_protocol`). A run whose config is invalid carries the error (it fails by name).
  Raises ValueError for settings no row can run with: a `--config.seed` override (the
  seeds are the runs'), or an override that undoes what a row changes."""
  keys = override_keys(overrides)
  if "seed" in keys:
    raise ValueError("--config.seed: the runs' seeds come from --seeds")
  base = load_config(config_spec, overrides)
  settings = {"split": split or base.eval_split,
              "protocol": protocol or base.eval_protocol}
  eval_common = ["--data_dir", str(base.data_dir), "--split", settings["split"],
                 "--protocol", settings["protocol"],
                 "--batch_size", str(base.eval_batch_size),
                 "--data_source", str(base.data_source)]
  runs = []
  for row in rows:
    if not row.trained:
      error = None if base.init_model else (
          "the config has no init_model to evaluate (--config.init_model)")
      runs.append(Run(row, None, out / "runs" / row.name, [],
                      ["--model", str(base.init_model or ""), *eval_common], error=error))
      continue
    changes = variant_changes(row.variant)
    if "seed" in changes:
      raise ValueError(f"row {row.name}: its variant sets the seed; --seeds does")
    for seed in seeds:
      spec = row_spec(config_spec, row, seed)
      folder = out / "runs" / row.name / f"seed{seed}"
      run = Run(row, seed, folder, ["--config", spec, *overrides],
                ["--model", str(folder / "workdir" / "model"), *eval_common])
      cfg = load_config(spec, overrides)
      undone = [k for k in keys if k in changes and cfg[k] != changes[k]]
      if undone:
        raise ValueError(f"row {row.name} sets {undone[0]}={changes[undone[0]]!r}, "
                         f"which --config.{undone[0]}={cfg[undone[0]]!r} undoes")
      run.total_steps = int(cfg.total_steps)
      try:
        config_lib.validate_config(cfg)
      except ValueError as e:
        run.error = f"invalid config: {e}"
      runs.append(run)
  # Seed-major: the untrained row, then every row at seed 0, then at seed 1, ...
  return sorted(runs, key=lambda r: -1 if r.seed is None else r.seed), settings


def _child_env() -> dict[str, str]:
  """This environment, with this package's folder first on PYTHONPATH."""
  root = str(Path(__file__).resolve().parents[1])
  path = os.environ.get("PYTHONPATH", "")
  return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def run_tool(tool: str, args: Sequence[str], log: Path) -> int:
  """`bin/TOOL ARGS` in a child process, its output appended to `log`; its exit status.
  On Ctrl-C the child (which got the signal too: bin/train saves and exits) is waited
  for, then KeyboardInterrupt goes on."""
  log.parent.mkdir(parents=True, exist_ok=True)
  with open(log, "a") as f:
    f.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} bin/{tool} "
            f"{' '.join(args)}\n")
    f.flush()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(tool=tool), *args],
                            stdout=f, stderr=subprocess.STDOUT, env=_child_env())
    try:
      return proc.wait()
    except KeyboardInterrupt:
      proc.wait()
      raise


def last_line(log: Path) -> str:
  """The last non-blank line of a log (a tool's error line, or a traceback's end)."""
  try:
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
  except FileNotFoundError:
    return ""
  return lines[-1][:300] if lines else ""


def logged_steps(workdir: Path) -> int:
  """The last training step `metrics.jsonl` logged (0 when none), read by the one
  reader of that file (`plots.read_metrics`, which names a broken line)."""
  from vldeformer_jax import plots
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return 0
  steps, _ = plots.read_metrics(path).get("loss", ([], []))
  return max(steps, default=0)


Tool = Callable[[str, Sequence[str], Path], int]  # run_tool's signature


def execute(run: Run, tool: Tool | None = None) -> str | None:
  """Trains (resuming) and evaluates one run as far as it still needs, each step by
  `tool` (default `run_tool`); None when it finished, else why it failed (one line)."""
  tool = tool or run_tool
  if run.error:
    return run.error
  if run.status() == "train":
    run.folder.mkdir(parents=True, exist_ok=True)
    run.write_record(row=run.row.name, seed=run.seed, train_args=run.train_args)
    log = run.folder / "train.log"
    start = time.perf_counter()
    code = tool("train", [*run.train_args, "--workdir", str(run.workdir)], log)
    if code != 0:
      return f"bin/train exited {code}: {last_line(log)} (log: {log})"
    steps = logged_steps(run.workdir)
    if steps < run.total_steps:
      return f"bin/train stopped at step {steps} of {run.total_steps} (log: {log})"
    run.write_record(train_s=round(time.perf_counter() - start, 1))
  if run.status() == "evaluate":
    run.folder.mkdir(parents=True, exist_ok=True)
    log = run.folder / "eval.log"
    run.eval_json.unlink(missing_ok=True)
    start = time.perf_counter()
    code = tool("eval", [*run.eval_args, "--output", str(run.eval_json)], log)
    if code != 0 or not run.eval_json.is_file():
      return f"bin/eval exited {code}: {last_line(log)} (log: {log})"
    run.write_record(row=run.row.name, seed=run.seed, eval_args=run.eval_args,
                     eval_s=round(time.perf_counter() - start, 1))
  return None


def run_metrics(run: Run) -> dict[str, float]:
  """R@K (and rsum) of a finished run, from its bin/eval output."""
  report = json.loads(run.eval_json.read_text())
  return {k: float(report["individual"][k]) for k in METRIC_KEYS}


# ----------------------------------------------------------------- aggregation
def spread(values: Sequence[float]) -> dict[str, float]:
  """Mean, least, largest and sample standard deviation (0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return {"mean": mean, "min": min(values), "max": max(values), "std": std}


def direction(row: dict, reference: dict) -> str:
  """Whether a row falls below the reference row in rsum, as every ablation of the
  paper does: 'yes' (every seed's rsum below every seed's of the reference), 'on the
  mean only' (the seeds' ranges overlap), 'no' (not below on the mean), or '' when
  either has no result."""
  if not row.get("runs") or not reference.get("runs") or row is reference:
    return ""
  if row["max"]["rsum"] < reference["min"]["rsum"]:
    return "yes"
  if row["mean"]["rsum"] < reference["mean"]["rsum"]:
    return "on the mean only"
  return "no"


def summarize(runs: Sequence[Run], rows: Sequence[Row], failures: dict[str, str]
              ) -> list[dict]:
  """Per row: its finished runs' metrics and times, mean/min/max/std of each metric,
  the paper's figures, failed runs by name, and whether the paper's direction holds."""
  out = []
  for row in rows:
    mine = [r for r in runs if r.row is row]
    finished = [r for r in mine if r.status() == "done"]
    per_run = {("init" if r.seed is None else str(r.seed)): {
        **run_metrics(r), **{k: r.record().get(k) for k in ("train_s", "eval_s")}}
        for r in finished}
    entry: dict[str, Any] = {
        "name": row.name, "label": row.label, "variant": row.variant,
        "in_paper": row.paper is not None, "paper": row.paper_metrics(),
        "seeds": [r.seed for r in finished if r.seed is not None],
        "runs": per_run,
        "failed": {r.name: failures[r.name] for r in mine if r.name in failures}}
    if per_run:
      stats = {k: spread([m[k] for m in per_run.values()]) for k in METRIC_KEYS}
      for stat in ("mean", "min", "max", "std"):
        entry[stat] = {k: stats[k][stat] for k in METRIC_KEYS}
    out.append(entry)
  reference = next((e for e in out if e["name"] == REFERENCE_ROW), None)
  for e in out:
    e["holds"] = direction(e, reference) if reference else ""
  return out


# -------------------------------------------------------------------- writing
def _write_text(path: Path, text: str) -> None:
  """Writes `path` whole or not at all (a temporary file renamed over it)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def _cell(entry: dict, key: str) -> str:
  if "mean" not in entry:
    return "–"
  mean, lo, hi = entry["mean"][key], entry["min"][key], entry["max"][key]
  return f"{mean:.1f}" if len(entry["runs"]) == 1 else f"{mean:.1f} [{lo:.1f}–{hi:.1f}]"


def markdown(summary: list[dict], meta: dict) -> str:
  """The table: each row's mean [min–max] over seeds, the paper's COCO 1k figures in
  the line below it, then the paper's directions and the runs' times."""
  head = ("| row | seeds | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 "
          "| rsum |\n|---|---|---|---|---|---|---|---|---|")
  lines = [f"# {meta['title']}", "",
           f"`{meta['command']}`", "",
           f"Config `{meta['config']}`, split `{meta['split']}`, protocol "
           f"`{meta['protocol']}`; seeds {', '.join(map(str, meta['seeds']))}. Each cell: "
           "the mean over seeds [least–largest]. In italics below a row: the paper's "
           "Table 5 (COCO 1k test, VinVL-base, batch 1024), for reference only: other "
           "data, model and scale. i2t: image → text (the paper's text retrieval), "
           "t2i: text → image (image retrieval).", "", head]
  for e in summary:
    seeds = ("– (one model)" if e["variant"] is None and e["runs"] else
             ", ".join(map(str, e["seeds"])) or "–")
    lines.append(f"| {e['label']} | {seeds} | "
                 + " | ".join(_cell(e, k) for k in METRIC_KEYS) + " |")
    if e["paper"]:
      lines.append("| *paper, COCO 1k* | | " + " | ".join(
          f"*{e['paper'][k]:.1f}*" for k in METRIC_KEYS) + " |")
  reference = next((e for e in summary if e["name"] == REFERENCE_ROW), None)
  if reference and "mean" in reference:
    lines += ["", "## The paper's directions: each ablation below VLDeformer in rsum", "",
              "| row | paper: rsum − VLDeformer's | here: mean rsum − VLDeformer's "
              "| below here? |", "|---|---|---|---|"]
    for e in summary:
      if e is reference:
        continue
      paper = (f"{e['paper']['rsum'] - reference['paper']['rsum']:+.1f}"
               if e["paper"] and reference["paper"] else "(not in the paper)")
      here = (f"{e['mean']['rsum'] - reference['mean']['rsum']:+.1f}" if "mean" in e
              else "–")
      lines.append(f"| {e['label']} | {paper} | {here} | {e['holds'] or '–'} |")
    lines += ["", "*below here?*: yes = every seed's rsum below every seed's of "
              "VLDeformer; on the mean only = below on the mean, the seeds' ranges "
              "overlap; no = not below on the mean."]
  failed = {name: why for e in summary for name, why in e["failed"].items()}
  if failed:
    lines += ["", "## Failed runs", ""] + [f"- **{n}**: {why}" for n, why in failed.items()]
  lines += ["", f"Time: {meta['train_s'] / 60:.1f} min of training and "
            f"{meta['eval_s'] / 60:.1f} min of evaluation over {meta['finished']} "
            f"finished runs (this invocation: {meta['wall_s'] / 60:.1f} min wall); "
            f"written {meta['written']}.", ""]
  return "\n".join(lines)


def write_outputs(out: Path, name: str, summary: list[dict], meta: dict) -> list[Path]:
  """NAME.json (everything), NAME.md (the table) and NAME.png (grouped R@K bars with
  each row's range over seeds) in `out`."""
  from vldeformer_jax import plots
  paths = [out / f"{name}.json", out / f"{name}.md"]
  _write_text(paths[0], json.dumps({**meta, "metrics": list(METRIC_KEYS),
                                    "rows": summary}, indent=2) + "\n")
  _write_text(paths[1], markdown(summary, meta))
  drawn = [e for e in summary if "mean" in e]
  if drawn:
    results = {e["label"]: e["mean"] for e in drawn}
    ranges = {e["label"]: {k: (e["min"][k], e["max"][k]) for k in RECALL_KEYS}
              for e in drawn if len(e["runs"]) > 1}
    fig = plots.plot_recall_bars(results, spread=ranges, title=(
        f"{meta['title']}: mean over seeds {', '.join(map(str, meta['seeds']))} "
        "(bars: least–largest)"))
    tmp = plots.save(fig, out / f".{name}.png.tmp-{os.getpid()}.png")
    os.replace(tmp, out / f"{name}.png")
    paths.append(out / f"{name}.png")
  return paths


def ablate(config_spec: str, overrides: Sequence[str], rows: Sequence[Row],
           seeds: Sequence[int], out: Path, split: str | None = None,
           protocol: str | None = None, name: str = "table5", command: str = "",
           tool: Tool | None = None, progress: bool = True) -> dict:
  """Runs what is missing of the ablation (tqdm over runs), rewriting the table after
  each; returns {'paths': files written, 'failed': {run: why}}. Raises ValueError for
  settings no run can use, before anything runs."""
  import tqdm
  out = Path(out)
  started = time.perf_counter()
  runs, settings = plan_runs(config_spec, overrides, rows, seeds, out, split, protocol)
  conflicts = [c for c in (r.conflict() for r in runs) if c]
  if conflicts:
    raise ValueError(conflicts[0])
  # Rows of the paper's table make it "Table 5"; only extra rows (a sweep) do not.
  title = ("Table 5 (the paper's ablation), reproduced" if any(r.paper for r in rows)
           else f"bin/ablate: {', '.join(r.name for r in rows)}")
  meta = {"title": title if name == "table5" else name, "command": command,
          "config": config_spec,
          "overrides": list(overrides), **settings, "seeds": list(seeds)}
  failures: dict[str, str] = {}

  def write() -> list[Path]:
    records = [r.record() for r in runs if r.status() == "done"]
    now = datetime.datetime.now().isoformat(timespec="seconds")
    meta.update(train_s=sum(r.get("train_s") or 0 for r in records),
                eval_s=sum(r.get("eval_s") or 0 for r in records),
                finished=len(records), wall_s=time.perf_counter() - started, written=now)
    return write_outputs(out, name, summarize(runs, rows, failures), meta)

  pending = [r for r in runs if r.status() != "done"]
  bar = tqdm.tqdm(total=len(runs), initial=len(runs) - len(pending), unit="run",
                  desc="ablate", disable=not progress, dynamic_ncols=True)
  paths = write() if len(pending) < len(runs) else []
  for run in pending:
    bar.set_postfix_str(run.name)
    why = execute(run, tool)
    if why is None:
      m = run_metrics(run)
      bar.write(f"{run.name}: i2t R@1 {m['i2t_r1']:.1f}, t2i R@1 {m['t2i_r1']:.1f}, "
                f"rsum {m['rsum']:.1f}")
    else:
      failures[run.name] = why
      bar.write(f"FAILED {run.name}: {why}")
    bar.update(1)
    paths = write()
  bar.close()
  return {"paths": paths or write(), "failed": failures}
