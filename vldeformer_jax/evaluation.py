"""Retrieval metrics (R@K) exactly as the literature reports them.

`retrieval_metrics(similarity, caption_to_image)` takes the full score matrix
[n_images, n_captions] and the index of each caption's image, and returns R@1/5/10 for
image->text and text->image plus their sum (rsum), in percent.

Ranks are pessimistic: the rank of the ground truth is the number of *wrong* items that
score at least as high as it (a tie with a wrong item counts against us), so a constant
scorer gets the lowest possible recall, never a lucky one. Image->text counts a hit when
any of the image's captions ranks within k (the rank of its best-scoring caption);
images without captions (pure distractors) are left out of the image->text average.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable

import numpy as np

from vldeformer_jax.data.eval_set import EvalSet  # noqa: F401 - part of this API
from vldeformer_jax.retrieval.index import l2_normalize

KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS) + ("rsum",)


def _check(similarity: np.ndarray, caption_to_image: np.ndarray) -> None:
  if similarity.ndim != 2:
    raise ValueError(f"similarity must be [n_images, n_captions], got {similarity.shape}")
  if caption_to_image.shape != (similarity.shape[1],):
    raise ValueError(f"caption_to_image has shape {caption_to_image.shape}, expected "
                     f"({similarity.shape[1]},)")
  if len(caption_to_image) and (caption_to_image.min() < 0
                                or caption_to_image.max() >= similarity.shape[0]):
    raise ValueError("caption_to_image holds an index outside [0, n_images)")
  if not np.all(np.isfinite(similarity)):
    raise ValueError("similarity contains NaN or Inf")


def text_to_image_ranks(similarity: np.ndarray, caption_to_image: np.ndarray
                        ) -> np.ndarray:
  """0-based pessimistic rank of each caption's image among all images: [n_captions]."""
  cols = np.arange(similarity.shape[1])
  gt = similarity[caption_to_image, cols]  # [n_captions]
  return (similarity >= gt[None, :]).sum(axis=0) - 1  # minus the ground truth itself


def image_to_text_ranks(similarity: np.ndarray, caption_to_image: np.ndarray
                        ) -> np.ndarray:
  """0-based pessimistic rank of each image's best caption among the wrong captions:
  [n_images], -1 for images that have no caption."""
  n_images = similarity.shape[0]
  own = caption_to_image[None, :] == np.arange(n_images)[:, None]  # [n_images, n_caps]
  best = np.where(own, similarity, -np.inf).max(axis=1)  # best own-caption score
  ranks = ((similarity >= best[:, None]) & ~own).sum(axis=1)
  return np.where(own.any(axis=1), ranks, -1)


def recall_at(ranks: np.ndarray, ks: Iterable[int] = KS) -> dict[int, float]:
  ranks = ranks[ranks >= 0]
  if len(ranks) == 0:
    raise ValueError("no queries to evaluate")
  return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def retrieval_metrics(similarity, caption_to_image) -> dict[str, float]:
  """R@1/5/10 both ways and rsum, in percent (see the module docstring)."""
  similarity = np.asarray(similarity, np.float32)
  caption_to_image = np.asarray(caption_to_image, np.int64)
  _check(similarity, caption_to_image)
  i2t = recall_at(image_to_text_ranks(similarity, caption_to_image))
  t2i = recall_at(text_to_image_ranks(similarity, caption_to_image))
  out = {f"i2t_r{k}": v for k, v in i2t.items()}
  out.update({f"t2i_r{k}": v for k, v in t2i.items()})
  out["rsum"] = sum(i2t.values()) + sum(t2i.values())
  return out


def embedding_similarity(text: np.ndarray, image: np.ndarray) -> np.ndarray:
  """Cosine similarity [n_images, n_captions] of r_v and r_t."""
  return l2_normalize(image)[0] @ l2_normalize(text)[0].T


# ------------------------------------------------------------------- protocols
@dataclasses.dataclass(frozen=True)
class Protocol:
  """Which images of a split an evaluation ranks, and how its R@K are averaged."""
  images: int | None  # the first this many images (an error if fewer); None: all
  fold: int | None    # the mean over folds of this many consecutive images; None: one


# The literature's protocols; the trainer (`config.eval_protocol`) and bin/eval share
# them. `--max_images N` / `config.eval_max_images` takes the first N images of a split.
PROTOCOLS: dict[str, Protocol] = {
    "all": Protocol(images=None, fold=None),       # every image of the split
    "coco1k": Protocol(images=None, fold=1000),    # COCO 1k: mean over 5 folds of 1k
    "coco5k": Protocol(images=5000, fold=None),    # COCO 5k test
    "flickr1k": Protocol(images=1000, fold=None),  # Flickr30k 1k test
}
# Names the trainer used before the two vocabularies became one.
RENAMED_PROTOCOLS = {"folds1k": "'coco1k' (the mean over folds of 1,000 images)",
                     "5k": "'coco5k' (the first 5,000 images)",
                     "1k": "'flickr1k' (the first 1,000 images)"}


def _protocol(name: str) -> Protocol:
  if name in RENAMED_PROTOCOLS:
    raise ValueError(f"protocol {name!r} is now {RENAMED_PROTOCOLS[name]}")
  if name not in PROTOCOLS:
    raise ValueError(f"protocol {name!r} is not one of {tuple(PROTOCOLS)}")
  return PROTOCOLS[name]


def protocol_set(eval_set: EvalSet, protocol: str) -> EvalSet:
  """The images a protocol evaluates: COCO 5k / Flickr 1k take the first 5,000 /
  1,000 images of the split (an error if it has fewer); coco1k and all take every
  image (coco1k then averages over folds of 1,000: an error, before anything is
  encoded, for a split that does not divide into them)."""
  n, fold = _protocol(protocol).images, _protocol(protocol).fold
  if fold and len(eval_set.image_ids) % fold:
    raise ValueError(f"protocol {protocol} averages over folds of {fold} images, the "
                     f"split has {len(eval_set.image_ids)} (use protocol 'all', or a "
                     f"multiple of {fold} images)")
  if n is None:
    return eval_set
  if len(eval_set.image_ids) < n:
    raise ValueError(f"protocol {protocol} needs {n} images, the split has "
                     f"{len(eval_set.image_ids)} (use protocol 'all')")
  return eval_set.subset(n)


def _both_ways(sim_i2t: np.ndarray, sim_t2i: np.ndarray | None,
               caption_to_image: np.ndarray) -> dict[str, float]:
  """R@K with image->text ranked by `sim_i2t` and text->image by `sim_t2i` (the same
  matrix when None)."""
  m = retrieval_metrics(sim_i2t, caption_to_image)
  if sim_t2i is not None:
    t2i = retrieval_metrics(sim_t2i, caption_to_image)
    m.update({k: v for k, v in t2i.items() if k.startswith("t2i")})
    m["rsum"] = sum(v for k, v in m.items() if k != "rsum")
  return m


def fold_metrics(similarity, caption_to_image, fold_size: int = 1000,
                 similarity_t2i: np.ndarray | None = None) -> dict[str, float]:
  """The COCO-1k protocol: the mean over folds of `fold_size` consecutive images (and
  their captions) of the R@K within each fold."""
  similarity = np.asarray(similarity, np.float32)
  caption_to_image = np.asarray(caption_to_image, np.int64)
  n_images = similarity.shape[0]
  if n_images % fold_size:
    raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
  folds = []
  for start in range(0, n_images, fold_size):
    caps = np.flatnonzero((caption_to_image >= start)
                          & (caption_to_image < start + fold_size))
    rows = slice(start, start + fold_size)
    folds.append(_both_ways(
        similarity[rows][:, caps],
        None if similarity_t2i is None else similarity_t2i[rows][:, caps],
        caption_to_image[caps] - start))
  return {k: float(np.mean([f[k] for f in folds])) for k in METRIC_KEYS}


def protocol_metrics(similarity: np.ndarray, caption_to_image: np.ndarray,
                     protocol: str, similarity_t2i: np.ndarray | None = None
                     ) -> dict[str, float]:
  """R@K of a score matrix (over `protocol_set`'s images) under a protocol.
  `similarity_t2i`, when given, ranks the text->image direction (re-ranking changes
  each direction's matrix differently)."""
  fold = _protocol(protocol).fold
  if fold:
    return fold_metrics(similarity, caption_to_image, fold, similarity_t2i)
  return _both_ways(similarity, similarity_t2i, caption_to_image)


def evaluate_encoder(encoder, eval_set: EvalSet, protocol: str = "all"
                     ) -> dict[str, float]:
  """R@K of a `VLDeformer` (individual encoding) on `eval_set` under `protocol`."""
  eval_set = protocol_set(eval_set, protocol)
  text = encoder.encode_text(eval_set.captions)
  image = encoder.encode_image(eval_set.tags, eval_set.regions)
  return protocol_metrics(embedding_similarity(text, image), eval_set.caption_to_image,
                          protocol)


# ------------------------------------------------- joint scoring and re-ranking
def score_pairs_for(encoder, eval_set: EvalSet, pairs: np.ndarray,
                    mode: str = "joint") -> np.ndarray:
  """Scores of (image index, caption index) pairs [P, 2] -> [P]: joint match logits
  (mode 'joint'), or the cosine of the encoder's individual embeddings ('individual':
  how a decomposed teacher orders candidates)."""
  if mode == "individual":
    images, captions = np.unique(pairs[:, 0]), np.unique(pairs[:, 1])
    v = encoder.encode_image([eval_set.tags[i] for i in images],
                             [eval_set.regions[i] for i in images])
    t = encoder.encode_text([eval_set.captions[c] for c in captions])
    v, t = l2_normalize(v)[0], l2_normalize(t)[0]
    rows = np.searchsorted(images, pairs[:, 0])
    cols = np.searchsorted(captions, pairs[:, 1])
    return np.sum(v[rows] * t[cols], axis=1).astype(np.float32)
  return encoder.score_pairs([eval_set.captions[c] for c in pairs[:, 1]],
                             [eval_set.tags[i] for i in pairs[:, 0]],
                             [eval_set.regions[i] for i in pairs[:, 0]])


def joint_similarity(encoder, eval_set: EvalSet) -> np.ndarray:
  """The cross-encoder's score for every (image, caption) pair: [n_images, n_captions].
  This is the O(n^2) cost VLDeformer removes."""
  n_img, n_cap = len(eval_set.image_ids), len(eval_set.captions)
  pairs = np.stack(np.meshgrid(np.arange(n_img), np.arange(n_cap), indexing="ij"),
                   -1).reshape(-1, 2)
  return score_pairs_for(encoder, eval_set, pairs).reshape(n_img, n_cap)


def rerank_order(joint_scores: np.ndarray) -> np.ndarray:
  """The re-ranking rule, shared by bin/eval, bin/serve and bin/report: a query's
  candidates (its encoder top-M, best first: [..., M]) ordered by joint score, ties
  kept in the encoder's order. Returns positions into the candidates [..., M]; the
  re-ranked candidates then stand above every candidate the joint scorer did not see."""
  return np.argsort(-np.asarray(joint_scores), axis=-1, kind="stable")


def rerank(encoder, eval_set: EvalSet, similarity: np.ndarray, top_m: int,
           similarity_weight: float = 0.0, mode: str = "joint"
           ) -> tuple[np.ndarray, np.ndarray, int]:
  """LightningDOT-style re-ranking: each query's top-M candidates under the encoder's
  `similarity` are re-scored by the joint model and placed above all other candidates
  in that order (`rerank_order`). With `similarity_weight` w, a candidate's new score
  is the joint score plus w x its cosine similarity, as ALBEF and BLIP add their
  contrastive similarity to the matching score; w = 1 / the training temperature puts
  both on the scale of a logit. Returns the score matrices the re-ranked orders give
  (i2t, t2i) and the number of joint pairs scored."""
  if top_m < 1:
    raise ValueError(f"--rerank must be >= 1, got {top_m}")
  if not 0 <= similarity_weight < np.inf:
    raise ValueError(f"--rerank_similarity_weight must be a finite number >= 0, got "
                     f"{similarity_weight}")
  n_img, n_cap = similarity.shape
  m_t2i, m_i2t = min(top_m, n_img), min(top_m, n_cap)
  top_images = np.argsort(-similarity, axis=0, kind="stable")[:m_t2i].T  # [n_cap, M]
  top_captions = np.argsort(-similarity, axis=1, kind="stable")[:, :m_i2t]  # [n_img, M]
  pairs = np.concatenate([
      np.stack([top_images.ravel(), np.repeat(np.arange(n_cap), m_t2i)], 1),
      np.stack([np.repeat(np.arange(n_img), m_i2t), top_captions.ravel()], 1)])
  pairs = np.unique(pairs, axis=0)
  scores = score_pairs_for(encoder, eval_set, pairs, mode)
  scores = scores + np.float32(similarity_weight) * similarity[pairs[:, 0], pairs[:, 1]]
  joint = np.full(similarity.shape, np.nan, np.float32)
  joint[pairs[:, 0], pairs[:, 1]] = scores
  # Re-ranked candidates sit above every other one, in `rerank_order`: scores past the
  # maximum, falling with the re-ranked position.
  top = np.float32(np.abs(similarity).max() + 1.0)

  def lifted(candidates: np.ndarray, joint_of: np.ndarray, axis: int) -> np.ndarray:
    order = np.take_along_axis(candidates, rerank_order(joint_of), axis=1)  # [Q, M]
    out = similarity.copy() if axis == 1 else similarity.T.copy()
    m = order.shape[1]
    np.put_along_axis(out, order, top + np.arange(m, 0, -1, dtype=np.float32)[None, :],
                      axis=1)
    return out if axis == 1 else out.T

  i2t = lifted(top_captions, np.take_along_axis(joint, top_captions, axis=1), 1)
  t2i = lifted(top_images, np.take_along_axis(joint.T, top_images, axis=1), 0)
  return i2t, t2i, len(pairs)


# How bin/eval scores pairs: the individual encoders (VLDeformer), or the joint
# cross-encoder on every pair (the VinVL baseline).
MODES = ("individual", "joint")


def run_eval(encoder, eval_set: EvalSet, protocol: str, mode: str = "individual",
             rerank_m: int = 0, joint_max_images: int = 0,
             rerank_similarity_weight: float = 0.0, reranker=None,
             rerank_mode: str = "joint") -> dict:
  """What `bin/eval` reports: R@K and wall time of each stage, as a JSON-able dict.

  mode 'individual': encode every image and caption once, cosine similarity (VLDeformer);
    with `rerank_m`, also the joint re-ranking of each query's top-M (see `rerank`) by
    `reranker`'s joint scorer (default: the encoder's own, on the same weights), or
    with `rerank_mode='individual'` by its individual embeddings' cosine.
  mode 'joint': the cross-encoder on all pairs (the VinVL baseline); with
    `joint_max_images`, on the first N images and their captions only, and the time for
    the whole set extrapolated from the measured per-pair time.
  """
  ev = protocol_set(eval_set, protocol)
  n_img, n_cap = len(ev.image_ids), len(ev.captions)
  report: dict = {"protocol": protocol, "mode": mode, "images": n_img, "captions": n_cap}
  if mode == "individual":
    start = time.perf_counter()
    image = encoder.encode_image(ev.tags, ev.regions)
    text = encoder.encode_text(ev.captions)
    sim = embedding_similarity(text, image)
    seconds = time.perf_counter() - start
    report["individual"] = {**protocol_metrics(sim, ev.caption_to_image, protocol),
                            "seconds": seconds}
    if rerank_m:
      start = time.perf_counter()
      sim_i2t, sim_t2i, pairs = rerank(reranker or encoder, ev, sim, rerank_m,
                                       rerank_similarity_weight, rerank_mode)
      report["rerank"] = {**protocol_metrics(sim_i2t, ev.caption_to_image, protocol,
                                             similarity_t2i=sim_t2i),
                          "top_m": rerank_m, "joint_pairs": pairs, "mode": rerank_mode,
                          "similarity_weight": rerank_similarity_weight,
                          "seconds": time.perf_counter() - start}
  elif mode == "joint":
    sub = ev.subset(joint_max_images) if 0 < joint_max_images < n_img else ev
    start = time.perf_counter()
    sim = joint_similarity(encoder, sub)
    seconds = time.perf_counter() - start
    pairs = sim.size
    sub_protocol = protocol if sub is ev else "all"
    report["joint"] = {
        **protocol_metrics(sim, sub.caption_to_image, sub_protocol),
        "images_scored": len(sub.image_ids), "pairs": pairs, "seconds": seconds,
        "estimated_seconds_all_pairs": seconds / max(pairs, 1) * n_img * n_cap}
  else:
    raise ValueError(f"--mode {mode!r} is not one of {MODES}")
  return report


def format_table(report: dict) -> str:
  """A table shaped like the paper's Table 2: text retrieval (image->text) then image
  retrieval (text->image), R@1/5/10, one row per stage."""
  head = (f"{'':<12} | {'Text Retrieval':^23} | {'Image Retrieval':^23} |\n"
          f"{'stage':<12} | {'R@1':>7}{'R@5':>8}{'R@10':>8} | {'R@1':>7}{'R@5':>8}"
          f"{'R@10':>8} | {'RSUM':>6} {'time (s)':>10}")
  rows = [f"{report['protocol']}: {report['images']} images, {report['captions']} "
          "captions" + (" (images from their tags only)" if report.get("tags_only") else ""),
          head, "-" * len(head.splitlines()[1])]
  for stage in ("individual", "rerank", "joint"):
    if stage not in report:
      continue
    m = report[stage]
    label = stage if stage != "rerank" else f"rerank@{m['top_m']}"
    rows.append(f"{label:<12} | {m['i2t_r1']:7.1f}{m['i2t_r5']:8.1f}{m['i2t_r10']:8.1f} | "
                f"{m['t2i_r1']:7.1f}{m['t2i_r5']:8.1f}{m['t2i_r10']:8.1f} | "
                f"{m['rsum']:6.1f} {m['seconds']:10.2f}")
    if stage == "joint" and m["images_scored"] < report["images"]:
      rows.append(f"  (joint scored the first {m['images_scored']} images; all "
                  f"{report['images']} would take about "
                  f"{m['estimated_seconds_all_pairs']:.0f} s)")
  return "\n".join(rows)


def evaluate_model_dir(model_dir: str, data_dir: str, split: str = "test",
                       protocol: str = "all", mode: str = "individual",
                       rerank_m: int = 0, joint_max_images: int = 0,
                       batch_size: int = 128, max_images: int = 0,
                       data_source: str = "raw", on_error: str = "error",
                       rerank_similarity_weight: float = 0.0,
                       tags_only: bool = False, rerank_model: str | None = None,
                       rerank_mode: str = "joint") -> dict:
  """`bin/eval`: loads a model dir and a split, shards encoding over all devices.
  `tags_only`: images encoded from their tags alone (`EvalSet.tags_only`);
  `rerank_model`: another model dir whose joint scorer re-ranks (e.g. a teacher)."""
  from vldeformer_jax.data.eval_set import load_eval_split
  from vldeformer_jax.encoder import load_pretrained
  from vldeformer_jax.sharding import make_mesh

  mesh = make_mesh()
  encoder = load_pretrained(model_dir, batch_size=-(-batch_size // mesh.size) * mesh.size,
                            mesh=mesh)
  eval_set = load_eval_split(data_dir, split, encoder.config,
                             data_source=data_source, on_error=on_error,
                             max_images=max_images)
  if tags_only:
    eval_set = eval_set.tags_only()
  reranker = None
  if rerank_model:
    reranker = load_pretrained(rerank_model, batch_size=encoder.batch_size, mesh=mesh)
    if reranker.config.img_feature_dim != encoder.config.img_feature_dim:
      raise ValueError(f"--rerank_model {rerank_model} takes "
                       f"{reranker.config.img_feature_dim}-d region features, --model "
                       f"{model_dir} {encoder.config.img_feature_dim}-d")
  report = run_eval(encoder, eval_set, protocol, mode, rerank_m, joint_max_images,
                    rerank_similarity_weight, reranker, rerank_mode)
  report.update(model=str(model_dir), data_dir=str(data_dir), split=split,
                devices=mesh.size, tags_only=tags_only,
                rerank_model=str(rerank_model or model_dir) if rerank_m else None)
  return report
