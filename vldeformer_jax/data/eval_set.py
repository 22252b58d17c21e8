"""The evaluation set: data, so it lives with the data (the pipeline builds it, the
evaluation reads it; neither imports the other's module for it)."""

from __future__ import annotations

import dataclasses

import numpy as np


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
