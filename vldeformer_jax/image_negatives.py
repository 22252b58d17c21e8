"""Image hard negatives (VLDeformer Sec. 3.4): objects swapped within a mini-batch.

The objects (tag + region feature row, which carries the box) whose tag occurs in the
aligned caption are replaced by random objects from the other examples of the
mini-batch, and `remaining_ratio` (half) of the other objects too.

Two steps, so the costly one can run once per caption, ahead of training
(`data/prepared.py`): `tags_in_caption` (which tags a caption names, compared by noun
lemma, from `pos_tagger.py`) then `swap_objects` (the draws, on indices only: the input
pipeline gathers the region rows itself). `image_negatives` runs both. Apart from the
noun lemmas, index arithmetic: no tagging, no WordNet; the text negatives are
`negatives.py`, whose argument checks this module shares.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from vldeformer_jax.negatives import _check_ratio, _check_rng
from vldeformer_jax.pos_tagger import _LETTERS, _noun_lemma


def _word_keys(text: str) -> list[tuple[str, str]]:
  """(lower-cased word, its noun lemma) per word (split at hyphens, apostrophes)."""
  return [(w, _noun_lemma(w)) for w in re.findall(_LETTERS, text.lower())]


class _TagIndex:
  """Finds which of a list of tags occur in a caption, in one pass over the caption.

  Tag words and caption words are compared lower-cased, either as written or as
  noun lemmas ("dogs" matches "dog", "tennis rackets" matches "tennis racket"); a
  multiword tag must appear as consecutive words.
  """

  def __init__(self, tags: Sequence[str]):
    if isinstance(tags, str):
      raise TypeError("object_tags must be a sequence of tag strings, not one string")
    self.size = len(tags)
    self.keys: dict[tuple[str, ...], list[int]] = {}
    self.max_len = 0
    for k, tag in enumerate(tags):
      if not isinstance(tag, str):
        raise TypeError(f"object tags must be strings, got {type(tag).__name__}")
      words = _word_keys(tag)
      if not words:
        continue
      self.max_len = max(self.max_len, len(words))
      for key in {tuple(w for w, _ in words), tuple(lem for _, lem in words)}:
        self.keys.setdefault(key, []).append(k)

  def matches(self, caption: str) -> np.ndarray:
    """bool [len(tags)]: which tags occur in the caption."""
    out = np.zeros(self.size, dtype=bool)
    words = _word_keys(caption)
    for s in range(len(words)):
      for n in range(1, min(self.max_len, len(words) - s) + 1):
        span = words[s:s + n]
        for key in {tuple(w for w, _ in span), tuple(lem for _, lem in span)}:
          for k in self.keys.get(key, ()):
            out[k] = True
    return out


def tags_in_caption(caption: str, object_tags: Sequence[str]) -> np.ndarray:
  """Which tags occur in the caption, as bool [len(object_tags)] (see `_TagIndex`)."""
  return _TagIndex(object_tags).matches(caption)


@dataclasses.dataclass(frozen=True)
class ImageNegatives:
  """Hard negative images for a batch, one entry per example.

  `object_tags[i]` and `regions[i]` have the lengths of the inputs; `replaced[i]` is
  a bool [n_i] marking replaced objects, `in_caption[i]` those whose tag occurred in
  caption i, and `source[i]` an int [n_i, 2] giving for every object the (example,
  object) it was taken from (its own position when kept).
  """

  object_tags: list[list[str]]
  regions: list[np.ndarray]
  replaced: list[np.ndarray]
  in_caption: list[np.ndarray]
  source: list[np.ndarray]


def image_negatives(captions: Sequence[str], object_tags: Sequence[Sequence[str]],
                    regions: Sequence[np.ndarray], rng: np.random.Generator,
                    remaining_ratio: float = 0.5) -> ImageNegatives:
  """Hard negative images (paper Sec. 3.4): objects swapped between batch examples.

  An object is a tag plus its region feature row (whose last dims hold the box), so
  both move together. For example i, every object whose tag occurs in caption i is
  replaced, and each other object is replaced with probability `remaining_ratio`.
  Replacements are drawn uniformly, with replacement, from the objects of the OTHER
  examples, skipping objects whose tag occurs in caption i (a mentioned object
  coming back would weaken the negative) unless only such objects exist.

  Args:
    captions: [B] the caption aligned with each image.
    object_tags: [B] per image, one tag per object (a tag may be several words).
    regions: [B] per image, float array [n_i, feature_dim] (row k = object k).
    rng: the randomness.
    remaining_ratio: share of the objects not named in the caption to replace.

  Returns:
    An `ImageNegatives` (new lists and arrays; the inputs are not modified).

  Raises:
    ValueError: a batch of fewer than 2 examples, mismatched lengths or feature
      dims, a ratio outside [0, 1], or objects to replace while the other examples
      hold none.
  """
  remaining_ratio = _check_ratio("remaining_ratio", remaining_ratio)
  _check_rng(rng)
  b = len(captions)
  if len(object_tags) != b or len(regions) != b:
    raise ValueError(
        f"captions, object_tags and regions must have one entry per example; got "
        f"{b}, {len(object_tags)} and {len(regions)}")
  if b < 2:
    raise ValueError(
        "image negatives draw replacement objects from the OTHER examples of the "
        f"mini-batch, which needs at least 2 examples; got {b}")
  feats = [np.asarray(r) for r in regions]
  dims = set()
  for i, (tags, r) in enumerate(zip(object_tags, feats)):
    if isinstance(tags, str):
      raise TypeError(f"object_tags[{i}] must be a list of tags, not one string")
    if r.ndim != 2:
      raise ValueError(f"regions[{i}] must be [n_objects, feature_dim], got {r.shape}")
    if r.shape[0] != len(tags):
      raise ValueError(
          f"example {i}: {len(tags)} tags but {r.shape[0]} region rows; each object "
          "is one tag plus one row")
    if r.shape[0]:
      dims.add(r.shape[1])
  if len(dims) > 1:
    raise ValueError(f"regions have different feature dims: {sorted(dims)}")
  sizes = np.array([len(t) for t in object_tags], dtype=np.int64)
  flat_tags = [tag for tags in object_tags for tag in tags]
  unique_tags = sorted(set(flat_tags))
  tag_id = {tag: k for k, tag in enumerate(unique_tags)}
  flat_ids = np.array([tag_id[t] for t in flat_tags], dtype=np.int64)
  index = _TagIndex(unique_tags)
  mentioned = np.stack([index.matches(c) for c in captions])
  swaps = swap_objects(sizes, flat_ids, mentioned, rng, remaining_ratio)
  out_tags, out_regions = [], []
  for i in range(b):
    reg = feats[i].copy()
    pairs = swaps.source[i].tolist()
    for row in np.flatnonzero(swaps.replaced[i]).tolist():
      j, k = pairs[row]
      reg[row] = feats[j][k]
    out_tags.append([object_tags[j][k] for j, k in pairs])
    out_regions.append(reg)
  return ImageNegatives(out_tags, out_regions, swaps.replaced, swaps.in_caption,
                        swaps.source)


@dataclasses.dataclass(frozen=True)
class ObjectSwaps:
  """Which objects an image negative takes from where; see `ImageNegatives`."""

  replaced: list[np.ndarray]  # [B] bool [n_i]
  in_caption: list[np.ndarray]  # [B] bool [n_i]
  source: list[np.ndarray]  # [B] int64 [n_i, 2]: (example, object) taken


def swap_objects(sizes: np.ndarray, object_ids: np.ndarray, mentioned: np.ndarray,
                 rng: np.random.Generator, remaining_ratio: float = 0.5) -> ObjectSwaps:
  """The draws of `image_negatives` on indices alone: no tags, no regions.

  `sizes[i]` objects per example, `object_ids` the tag id of every object (examples
  concatenated), `mentioned[i, t]` whether tag id t occurs in caption i. Tag ids may
  come from any vocabulary holding the batch's tags (the batch's own, a dataset's):
  the draws depend only on which objects are mentioned, so the result is the same.
  The caller moves the tags and regions (`image_negatives` does, the input pipeline
  gathers region rows by index).
  """
  remaining_ratio = _check_ratio("remaining_ratio", remaining_ratio)
  sizes = np.asarray(sizes, np.int64)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  owner = np.repeat(np.arange(len(sizes)), sizes)
  replaced, in_caps, sources = [], [], []
  for i, n in enumerate(sizes.tolist()):
    in_cap = mentioned[i][object_ids[starts[i]:starts[i + 1]]]
    repl = in_cap | (rng.random(n) < remaining_ratio)
    source = np.stack([np.full(n, i), np.arange(n)], axis=1).astype(np.int64)
    n_repl = int(repl.sum())
    if n_repl:
      donors = _draw_donors(rng, n_repl, i, starts, object_ids, mentioned[i])
      source[repl, 0] = owner[donors]
      source[repl, 1] = donors - starts[owner[donors]]
    replaced.append(repl)
    in_caps.append(in_cap)
    sources.append(source)
  return ObjectSwaps(replaced, in_caps, sources)


def _draw_donors(rng: np.random.Generator, count: int, i: int, starts: np.ndarray,
                 flat_ids: np.ndarray, mentioned: np.ndarray,
                 max_rounds: int = 8) -> np.ndarray:
  """Flat indices of `count` objects drawn uniformly from examples other than i.

  Objects whose tag is mentioned in caption i (`mentioned`, over unique tag ids;
  `flat_ids` maps flat object index -> tag id) are skipped: rejection sampling,
  then an exact draw from the allowed set; when every other object is mentioned,
  they are all allowed.
  """
  lo, hi = int(starts[i]), int(starts[i + 1])
  total = int(starts[-1])
  others = total - (hi - lo)
  if others == 0:
    raise ValueError(
        f"example {i} has objects to replace but the other examples have none")

  def draw(k: int) -> np.ndarray:
    r = rng.integers(others, size=k)
    return np.where(r >= lo, r + (hi - lo), r)

  out = draw(count)
  bad = mentioned[flat_ids[out]]
  for _ in range(max_rounds):
    if not bad.any():
      return out
    out[bad] = draw(int(bad.sum()))
    bad = mentioned[flat_ids[out]]
  if not bad.any():
    return out
  other_idx = np.concatenate([np.arange(lo), np.arange(hi, total)])
  allowed = other_idx[~mentioned[flat_ids[other_idx]]]
  if allowed.size == 0:
    return out  # every other object is mentioned: take them as drawn
  out[bad] = allowed[rng.integers(allowed.size, size=int(bad.sum()))]
  return out
