"""The evaluation set: every image and caption of a split once, read and batched.

One concern: the data an evaluation scores. `EvalSet` holds it; `read_eval_set`
reads it through a data source with the eval set's own options (`EvalOptions`: the
source keys, `max_regions`, `max_images`), which the trainer's `load_eval_set(config,
split)` takes from its config and `bin/eval`'s `load_eval_split` from a model's
config. Objects are cut to `max_regions` as in training, so both see images alike.
`eval_batches` pads the set into model batches, sharded over processes. It lives with
the data, so the evaluation and the training pipeline need not import each other; no
training keys here, no ml_collections.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator

import numpy as np

from vldeformer_jax.data.options import SourceOptions, config_values, require_int
from vldeformer_jax.data.sources import each_image
from vldeformer_jax.inputs import InputBuilder


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

  def tags_only(self) -> "EvalSet":
    """The same set with every image's region features left out (tags alone): R@K on
    it is what a model reaches without looking at the pixels' features, e.g. to check
    that a result is not a tag-only shortcut."""
    return dataclasses.replace(self, regions=[r[:0] for r in self.regions])

  def subset(self, num_images: int) -> "EvalSet":
    """The first `num_images` images and their captions."""
    keep = np.flatnonzero(self.caption_to_image < num_images)
    return EvalSet(self.image_ids[:num_images], self.tags[:num_images],
                   self.regions[:num_images], [self.captions[c] for c in keep],
                   self.caption_to_image[keep])


# ----------------------------------------------------------------------------------
# Reading a split.


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions(SourceOptions):
  """What an eval set reads: a source (`SourceOptions`) and how many of its images
  (0: all); checked when built."""

  max_images: int = 0

  def __post_init__(self):
    super().__post_init__()
    require_int(self, "max_images", key="eval_max_images")  # The trainer's key.


def read_eval_set(options: EvalOptions, split: str) -> EvalSet:
  """Every image and caption of `split` once, in key-file order.

  With `options.max_images > 0`, only the first that many images (and their
  captions). Objects are cut to `max_regions` as in training. Under
  `on_error='skip'` a bad image is left out (and reported).
  """
  source = options.spec(split).open()
  image_ids, tags, regions, captions, owner = [], [], [], [], []
  for example, objects in each_image(source, options.max_regions, options.on_error,
                                     options.max_images):
    captions += example.captions
    owner += [len(image_ids)] * len(example.captions)
    image_ids.append(example.image_id)
    tags.append(objects.tag_string)
    regions.append(objects.regions)
  return EvalSet(image_ids, tags, regions, captions, np.asarray(owner, np.int64))


def load_eval_set(config: Any, split: str) -> EvalSet:
  """`read_eval_set` with a trainer config's (`ConfigDict`) source keys, max_regions
  and eval_max_images."""
  return read_eval_set(EvalOptions(**config_values(config, SourceOptions),
                                   max_images=config["eval_max_images"]), split)


def load_eval_split(data_dir: str | os.PathLike, split: str, model_config: Any,
                    **options: Any) -> EvalSet:
  """`read_eval_set` for a model: feature size and max_regions from its `ModelConfig`;
  `options` are the other `EvalOptions` fields (data_source, box_order, on_error,
  max_images), their defaults those of `EvalOptions`."""
  return read_eval_set(EvalOptions(data_dir=str(data_dir),
                                   feature_dim=model_config.img_feature_dim,
                                   max_regions=model_config.max_regions, **options),
                       split)


# ----------------------------------------------------------------------------------
# Batches.


def _fixed_batch(inputs: InputBuilder, seqs, length: int, regions=None,
                 num_regions: int | None = None, rows: int | None = None
                 ) -> dict[str, np.ndarray]:
  return inputs.batch(seqs, regions, length=length, num_regions=num_regions,
                      rows=rows).as_dict()


def num_eval_batches(num_items: int, batch_size: int) -> int:
  """Global batches needed for `num_items` (the same on every process)."""
  return math.ceil(num_items / batch_size)


def eval_batches(eval_set: EvalSet, inputs: InputBuilder, *, modality: str,
                 batch_size: int, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, Any]]:
  """Every caption ('text') or image ('image') of `eval_set` once, in padded batches.

  Global batch g holds items [g * batch_size, (g + 1) * batch_size); process p yields
  its contiguous share of `batch_size // process_count` rows as
  `{modality: model inputs, "valid": bool [b], "index": int64 [b]}`, `index` being the
  item's position in the eval set (-1 on padding rows, which are all-mask-0). Every
  process yields `num_eval_batches` batches, so a sharded step runs the same number
  of times everywhere; the valid rows over all processes and batches are each item
  exactly once.
  """
  if modality not in ("text", "image"):
    raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the "
                     f"{process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got "
                     f"{process_index}")
  cfg = inputs.config
  local = batch_size // process_count
  n = len(eval_set.captions) if modality == "text" else len(eval_set.image_ids)
  for g in range(num_eval_batches(n, batch_size)):
    start = g * batch_size + process_index * local
    index = np.arange(start, start + local, dtype=np.int64)
    valid = index < n
    index[~valid] = -1
    items = index[valid].tolist()
    if modality == "text":
      seqs = inputs.text_sequences([eval_set.captions[i] for i in items])
      model = _fixed_batch(inputs, seqs, cfg.max_text_len, rows=local)
    else:
      seqs = inputs.image_sequences([eval_set.tags[i] for i in items])
      model = _fixed_batch(inputs, seqs, cfg.max_tag_len,
                           [eval_set.regions[i] for i in items], cfg.max_regions, local)
    yield {modality: model, "valid": valid, "index": index}
