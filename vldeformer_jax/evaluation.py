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
from typing import Iterable

import numpy as np

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


def fold_metrics(similarity, caption_to_image, fold_size: int = 1000
                 ) -> dict[str, float]:
  """The COCO-1k protocol: the mean over folds of `fold_size` consecutive images (and
  their captions) of `retrieval_metrics` within each fold."""
  similarity = np.asarray(similarity, np.float32)
  caption_to_image = np.asarray(caption_to_image, np.int64)
  n_images = similarity.shape[0]
  if n_images % fold_size:
    raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
  folds = []
  for start in range(0, n_images, fold_size):
    caps = np.flatnonzero((caption_to_image >= start)
                          & (caption_to_image < start + fold_size))
    folds.append(retrieval_metrics(similarity[start:start + fold_size][:, caps],
                                   caption_to_image[caps] - start))
  return {k: float(np.mean([f[k] for f in folds])) for k in METRIC_KEYS}


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Every image and every caption of an evaluation split, each exactly once.

  tags[i], regions[i]: image i's tag string and region features [n_i, feature_dim];
  captions[c] belongs to image caption_to_image[c].
  """
  image_ids: list[str]
  tags: list[str]
  regions: list[np.ndarray]
  captions: list[str]
  caption_to_image: np.ndarray

  def __post_init__(self):
    if not len(self.image_ids) == len(self.tags) == len(self.regions):
      raise ValueError("image_ids, tags and regions must have the same length")
    if len(self.captions) != len(self.caption_to_image):
      raise ValueError("captions and caption_to_image must have the same length")

  def subset(self, num_images: int) -> "EvalSet":
    """The first `num_images` images and their captions."""
    keep = np.flatnonzero(self.caption_to_image < num_images)
    return EvalSet(self.image_ids[:num_images], self.tags[:num_images],
                   self.regions[:num_images], [self.captions[c] for c in keep],
                   self.caption_to_image[keep])


def embedding_similarity(text: np.ndarray, image: np.ndarray) -> np.ndarray:
  """Cosine similarity [n_images, n_captions] of r_v and r_t."""
  norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return norm(image) @ norm(text).T


def evaluate_encoder(encoder, eval_set: EvalSet, protocol: str = "all"
                     ) -> dict[str, float]:
  """R@K of a `VLDeformer` (individual encoding) on `eval_set`.

  protocol 'all': every image of the set; 'folds1k': mean over folds of 1,000 images
  (COCO 1k); '5k'/'1k': the first 5,000 / 1,000 images.
  """
  if protocol in ("1k", "5k"):
    eval_set = eval_set.subset(1000 if protocol == "1k" else 5000)
  text = encoder.encode_text(eval_set.captions)
  image = encoder.encode_image(eval_set.tags, eval_set.regions)
  sim = embedding_similarity(text, image)
  if protocol == "folds1k":
    return fold_metrics(sim, eval_set.caption_to_image, fold_size=1000)
  if protocol not in ("all", "1k", "5k"):
    raise ValueError(f"unknown protocol {protocol!r} (all, 1k, 5k, folds1k)")
  return retrieval_metrics(sim, eval_set.caption_to_image)
