"""The speed study's report: its tables, notes and plot, and bin/bench's outputs.

`report_markdown` renders a `speed.run_study` result (or several runs merged with
`merge_runs`) as the Markdown of BENCHMARKS.md's speed section: the all-pairs table
(paper Fig. 5, `plot_all_pairs` draws it), the single-query table (Table 4, ours and
PyTorch) and notes on how each figure was made. `publish` writes what bin/bench's
flags ask for; `read_report` reads an earlier run's --output back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from vldeformer_jax import fileio, plots
from vldeformer_jax.speed import CAPTIONS_PER_IMAGE, NUM_REGIONS

# bin/bench --write_benchmarks writes this section of BENCHMARKS.md.
SECTION = "speed_study"
TITLE = ("Speed study: individual encoder vs joint scorer, single-query response vs "
         "PyTorch (paper Sec. 4.4)")


def plot_all_pairs(results: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
  """Fig. 5: all-pairs retrieval time (log scale) against the number of images, the
  individual encoder and the joint scorer for each model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, res in enumerate(results):
    rows = res["all_pairs"]["rows"]
    x = [r["images"] for r in rows]
    colour = f"C{2 * i}"
    ax.plot(x, [r["individual_s"] for r in rows], "o-", color=colour,
            label=f"individual encoder ({res['label']})")
    ax.plot(x, [r["joint_s"] for r in rows], "s--", color=f"C{2 * i + 1}",
            label=f"joint scorer, extrapolated ({res['label']})")
    for r in rows:
      ax.annotate(f"{r['speedup']:,.0f}x", (r["images"], r["joint_s"]),
                  textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
  ax.set_yscale("log")
  ax.set_xticks([r["images"] for r in results[0]["all_pairs"]["rows"]])
  ax.set_xticklabels([f"{r['images'] // 1000}k" if r["images"] % 1000 == 0
                      else str(r["images"]) for r in results[0]["all_pairs"]["rows"]])
  ax.set_xlabel("images (5 captions each)")
  ax.set_ylabel("text-to-image retrieval time, all pairs (s)")
  device = results[0].get("device", "")
  ax.set_title(f"All-pairs retrieval time, batch {results[0]['all_pairs']['batch_size']}"
               + (f", {device}" if device else ""), fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return plots.save(fig, path, dpi=120, tool="bin/bench")


def _duration(s: float) -> str:
  """Seconds in the unit that reads best: s, min, h or d."""
  if s < 120:
    return f"{s:.1f} s"
  if s < 7200:
    return f"{s / 60:.1f} min"
  if s < 2 * 86400:
    return f"{s / 3600:.1f} h"
  return f"{s / 86400:.1f} d"


def all_pairs_table(results: Sequence[dict[str, Any]]) -> str:
  """(a) as a Markdown table: one row per model and number of images."""
  rows = ["| model | images | captions | pairs | encode images | encode captions | "
          "similarity + top-k | individual total | joint (extrapolated) | speed-up |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for res in results:
    for r in res["all_pairs"]["rows"]:
      scaled = "" if r["encoded_images"] == r["images"] else " *"
      rows.append(
          f"| {res['label']} | {r['images']:,} | {r['captions']:,} | {r['pairs']:,} | "
          f"{r['encode_images_s']:.1f} s{scaled} | "
          f"{r['encode_captions_s']:.1f} s{scaled} "
          f"| {r['similarity_topk_s']:.2f} s | {_duration(r['individual_s'])} | "
          f"{_duration(r['joint_s'])} | **{r['speedup']:,.0f}x** |")
  return "\n".join(rows)


def single_query_table(results: Sequence[dict[str, Any]]) -> str:
  """(b) + (c) as a Markdown table: one row per model, gallery size and path."""
  rows = ["| model | gallery N | queries | path | avg | min | max | p50 | P95 | P99.99 "
          "| mem (GB) | ours/PyTorch avg (p50) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for res in results:
    for r in res["single_query"]:
      halves = [(n, f"ours, {n[len('ours_'):]} gallery (recall@{r['k']} "
                 f"{r[n]['recall_at_k']:.4f})") for n in r if n.startswith("ours_")]
      for name, label in (("ours", "ours (JAX)"), *halves, ("torch", "PyTorch")):
        if name not in r:
          continue
        s = r[name]
        ratio = (f"**{r['ratio_avg']:.2f}** ({r['ratio_p50']:.2f})"
                 if name == "ours" and "ratio_avg" in r else
                 f"{s['ratio_avg']:.2f} ({s['ratio_p50']:.2f})" if "ratio_avg" in s
                 else "")
        rows.append(
            f"| {res['label']} | {r['gallery']:,} | {r['queries']} | {label} | "
            f"{s['avg_ms']:.2f} | {s['min_ms']:.2f} | {s['max_ms']:.2f} | "
            f"{s['p50_ms']:.2f} | {s['p95_ms']:.2f} | {s['p99_99_ms']:.2f} | "
            f"{s['mem_gb']:.2f} | {ratio} |")
  return "\n".join(rows)


def notes(results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
  """The bullet list under the tables: how and where each figure was measured."""
  lines = [f"- measured by `{meta['command']}`."] if meta.get("command") else []
  lines += [
      f"- device: {meta['device']}; torch {meta.get('torch_device', '-')}, "
      f"{meta.get('torch_threads', '-')} threads; load average {meta['load'][0]:.2f} "
      f"before, {meta['load'][1]:.2f} after; total run {meta['total_s']:.0f} s.",
      "- inputs: synthetic COCO-like captions (median "
      f"{meta['caption_tokens_median']:.0f} tokens with [CLS]/[SEP]), images of "
      f"{NUM_REGIONS} regions x feature_dim features + one tag per region (tag sequence "
      "cut at max_tag_len); galleries for the single-query study are random unit "
      "vectors (encoding them is the offline cost that the all-pairs table measures).",
  ]
  for res in results:
    run = res.get("run")
    if run:
      load = run.get("load") or (float("nan"), float("nan"))
      lines.append(
          f"- {res['label']}: measured in a separate run, `{run.get('command')}` "
          f"({run.get('device')}, {run.get('total_s') or 0:.0f} s, load average "
          f"{load[0]:.2f} before, {load[1]:.2f} after).")
    ap = res.get("all_pairs")
    if ap:
      bs = ap["batch_size"]
      lines.append(
          f"- {res['label']}, all pairs: joint = mean of "
          f"{len(ap['joint_batch_seconds'])} "
          f"measured batches of {bs} random pairs ("
          + ", ".join(f"{s:.2f}" for s in ap["joint_batch_seconds"])
          + f" s) x batches for all n x 5n pairs, as the paper estimated VinVL; "
          f"encoding measured on {ap['max_encode']:,} images and their "
          f"{ap['max_encode'] * CAPTIONS_PER_IMAGE:,} captions"
          + (" (* scaled linearly to n)" if any(r["encoded_images"] < r["images"]
                                                for r in ap["rows"]) else "")
          + f"; similarity + top-{ap['k']} of every caption over all n images "
          "(`ExactIndex`) timed at full size; encoder batch size " f"{bs}.")
    for r in res.get("single_query", []):
      if "agreement" in r:
        a = r["agreement"]
        lines.append(
            f"- {res['label']}, N={r['gallery']:,}: top-{r['k']} ids identical for "
            f"{100 * a['identical']:.1f}% of queries (same set "
            f"{100 * a['same_set']:.1f}%), "
            f"max |score diff| {a['max_score_diff']:.1e}; resident ours "
            f"{r['ours']['resident_bytes'] / 2**20:.0f} MiB / PyTorch "
            f"{r['torch']['resident_bytes'] / 2**20:.0f} MiB, peak RSS growth while "
            f"querying ours {r['ours']['peak_rss_delta_bytes'] / 2**20:.1f} MiB / "
            "PyTorch "
            f"{r['torch']['peak_rss_delta_bytes'] / 2**20:.1f} MiB"
            + (f"; JAX device peak {r['ours']['device_peak_bytes'] / 2**30:.2f} GiB"
               if "device_peak_bytes" in r["ours"] else "")
            + (f"; PyTorch threads {r['torch']['threads']}" if "threads" in r["torch"]
               else "") + ".")
  lines.append(
      "- single query = one caption string in, top-10 gallery ids out: tokenize, encode "
      "(one encoder pass), L2-normalise, dot product with every gallery row, top-k; "
      "each of the distinct queries once per path, paths timed in alternating blocks "
      "(rounds) so that noise from other processes hits both. Ours is one jitted "
      "program from token ids to top-k (`ExactIndex.search_texts`) that scores the "
      "gallery in one chunk (one query fits its score budget) and takes an exact "
      "two-stage top-k (per 4,096-row block, then over the candidates); a bfloat16 / "
      "float16 gallery row (when measured) gives its recall@k against float32. PyTorch "
      "scores with one matmul. "
      "P95 / P99.99 are NumPy percentiles (linear interpolation): over 1,000 or fewer "
      "timings P99.99 lies between the two slowest, i.e. it is about the max. "
      "mem = model parameters + "
      "gallery as held by the path + peak RSS growth while querying. Ratios ours/PyTorch "
      "< 1: ours faster.")
  return "\n".join(lines)


def report_markdown(report: dict[str, Any], plot_path: str | os.PathLike | None = None,
                    relative_to: str | os.PathLike | None = None) -> str:
  """The study as Markdown: the all-pairs table (Fig. 5), a link to the plot (with
  `relative_to`, only a plot inside that folder, relative to it), the single-query
  table (Table 4, ours and PyTorch) and notes on how each figure was made."""
  results, meta = report["results"], report["meta"]
  parts = []
  if any("all_pairs" in r for r in results):
    parts += ["### (a) All-pairs text-to-image retrieval (paper Fig. 5)", "",
              all_pairs_table([r for r in results if "all_pairs" in r]), ""]
    shown = None
    if plot_path and relative_to is None:
      shown = Path(plot_path)
    elif plot_path:
      try:
        shown = Path(plot_path).resolve().relative_to(Path(relative_to).resolve())
      except ValueError:  # A plot outside the repository is not linked.
        shown = None
    if shown is not None:
      parts += [f"![all-pairs retrieval time]({shown.as_posix()})", ""]
  parts += ["### (b) + (c) Single-query response, ms (paper Table 4), ours vs PyTorch",
            "", single_query_table(results), "", notes(results, meta)]
  return "\n".join(parts)


def versions() -> str:
  """The versions of jax, flax, torch and transformers (those installed)."""
  out = [f"jax {jax.__version__}"]
  for name in ("flax", "torch", "transformers"):
    try:
      out.append(f"{name} {__import__(name).__version__}")
    except ImportError:
      pass
  return ", ".join(out)


# ------------------------------------------------------------------ runs and files

def read_report(path: str | os.PathLike, whole: bool = True) -> dict[str, Any]:
  """An earlier run's bin/bench --output; ValueError when it cannot be read or is not
  one (`whole`: with its `meta`, as re-rendering needs; else `results` suffice)."""
  try:
    report = json.loads(Path(path).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(str(e)) from None
  keys = ("results", "meta") if whole else ("results",)
  if not isinstance(report, dict) or any(k not in report for k in keys):
    raise ValueError("not a bin/bench --output file")
  return report


def merge_runs(report: dict[str, Any], others: Sequence[dict[str, Any]]
               ) -> dict[str, Any]:
  """Adds the models of other runs to `report` (in place), each result keeping its own
  run's command, duration, load and device under "run" (the notes name them)."""
  for other in others:
    for res in other["results"]:
      res.setdefault("run", {k: other.get("meta", {}).get(k)
                             for k in ("command", "total_s", "load", "device")})
    report["results"] += other["results"]
  return report


def publish(report: dict[str, Any], plot: str | os.PathLike | None = None,
            output: str | os.PathLike | None = None,
            relative_to: str | os.PathLike | None = None,
            log: Callable[[str], None] = print) -> str:
  """Draws the plot (when a model has all-pairs rows), logs the Markdown, writes the
  report as JSON to `output`; returns the Markdown (`report_markdown`)."""
  results = report["results"]
  body = report_markdown(report, plot_path=plot, relative_to=relative_to)
  if plot and any("all_pairs" in r for r in results):
    plot_all_pairs([r for r in results if "all_pairs" in r], plot)
    log(f"wrote {plot}")
  log("\n" + body)
  if output:
    log(f"wrote {fileio.write_marked_json(output, report, 'bin/bench')}")
  return body
