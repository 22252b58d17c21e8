"""A split as images addressed by index: the released layout or its TFDS build.

`SourceSpec` names a split and how to read it; it is small and picklable, so a worker
process opens its own readers from it (`spec.open()`). Both sources give
`readers.RetrievalExample`s: regions float32 with canonical boxes from the raw layout,
float16-rounded features with exact float32 boxes from TFDS (`tfds_builder`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Protocol

import numpy as np

from vldeformer_jax.data import errors, readers

DATA_SOURCES = ("raw", "tfds")


class ExampleSource(Protocol):
  """One split, image i = line i of its key file."""

  split: str
  location: str  # What a DataError about an example names (file or dataset dir).
  listing: str  # What lists the split's images (key file or dataset dir).
  image_ids: list[str]
  num_captions: np.ndarray  # [num_images] int64
  report: errors.SkipReport

  def read(self, index: int) -> readers.RetrievalExample: ...


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """Which split of which data, and how to read it (see `readers.VinVLRetrievalData`)."""

  data_source: str  # 'raw' or 'tfds'
  data_dir: str  # the released layout, or the directory `build_tfds` returned
  split: str
  feature_dim: int = readers.DEFAULT_FEATURE_DIM
  box_order: str = "auto"
  on_error: str = "error"

  def open(self) -> ExampleSource:
    if self.data_source == "tfds":
      return TfdsSource(self)
    if self.data_source == "raw":
      return RawSource(self)
    raise ValueError(f"data_source must be one of {DATA_SOURCES}, got "
                     f"{self.data_source!r}")


class RawSource:
  """The released layout through `readers.VinVLRetrievalData` (files opened lazily)."""

  def __init__(self, spec: SourceSpec | None = None, *,
               data: readers.VinVLRetrievalData | None = None):
    """From a spec, or around an open split (`data`)."""
    self.data = data if data is not None else readers.VinVLRetrievalData(
        spec.data_dir, spec.split, feature_dim=spec.feature_dim,
        box_order=spec.box_order, on_error=spec.on_error)
    self.split = self.data.split
    self.location = str(self.data.features.path)
    self.listing = str(self.data.keys_path or self.data.data_dir)
    self.image_ids = list(self.data.image_ids)
    self.num_captions = np.array([len(self.data.captions[i]) for i in self.image_ids],
                                 np.int64)
    self.report = self.data.report

  def read(self, index: int) -> readers.RetrievalExample:
    return self.data.example(self.image_ids[index])


class TfdsSource:
  """A split of the dataset written by `tfds_builder.build_tfds`, read by record."""

  def __init__(self, spec: SourceSpec):
    from vldeformer_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    self._tfds = tfds_builder
    try:
      builder = tfds_builder.load_builder(spec.data_dir)
    except FileNotFoundError as e:
      raise ValueError(f"--config.data_dir={spec.data_dir!r}: not a TFDS build for "
                       f"data_source='tfds' ({e})") from None
    dim = builder.info.features["regions"].shape[-1]
    if dim != spec.feature_dim:
      raise ValueError(f"--config.feature_dim={spec.feature_dim!r}: but the TFDS "
                       f"dataset in {builder.data_dir} stores {dim}-dim regions")
    self.split = spec.split
    self.location = self.listing = str(builder.data_dir)
    self.image_ids, self.num_captions = tfds_builder.split_index(builder, spec.split)
    self.source = builder.as_data_source(spec.split)
    if len(self.source) != len(self.image_ids):
      raise errors.DataError(builder.data_dir, f"split {spec.split!r} holds "
                             f"{len(self.source)} records but its metadata lists "
                             f"{len(self.image_ids)} images", kind="tfds_metadata")
    self.report = errors.SkipReport()

  def read(self, index: int, dtype: type = np.float32) -> readers.RetrievalExample:
    """Record `index`; `dtype=np.float16` keeps the stored features (boxes rounded)."""
    example = self._tfds.read_record(self.source[index], dtype)
    if example.image_id != self.image_ids[index]:
      raise errors.DataError(self.location, f"record {index} of "
                             f"split {self.split!r} is image {example.image_id}, the "
                             f"metadata says {self.image_ids[index]}",
                             kind="tfds_metadata", key=self.image_ids[index])
    return example


@dataclasses.dataclass(frozen=True)
class Objects:
  """An image's objects, cut to `max_regions`: tag k goes with region row k."""

  tags: list[str]
  regions: np.ndarray  # [n, feature_dim]

  @property
  def tag_string(self) -> str:
    return " ".join(self.tags)


def image_objects(example: readers.RetrievalExample, max_regions: int | None,
                  features_path: str | os.PathLike = "<features>") -> Objects:
  """The first `max_regions` (tag, region) objects (None: all); unequal counts are a
  `DataError`."""
  if len(example.tags) != len(example.regions):
    raise errors.DataError(
        features_path, f"{len(example.tags)} tags in the predictions but "
        f"{len(example.regions)} regions in the features: objects (tag + region) "
        "cannot be paired", kind="tag_region_mismatch", key=example.image_id)
  return Objects(list(example.tags[:max_regions]), example.regions[:max_regions])


def empty_split_error(split: str, listing: str | os.PathLike) -> errors.DataError:
  """A split without images: what evaluation, the index, the report and
  bin/build_data refuse before any work (`listing`: what lists its images)."""
  return errors.DataError(listing, f"split {split!r} has no images", kind="empty_split")


def each_image(source: ExampleSource, max_regions: int | None, on_error: str,
               limit: int = 0) -> Iterator[tuple[readers.RetrievalExample, Objects]]:
  """Each image of a split once, in key-file order (the first `limit` when > 0), with
  the objects every consumer encodes (`image_objects`): what evaluation, the index and
  the report read. A bad image raises ("error") or is left out and recorded in
  `source.report` ("skip"); the report is logged at the end of a pass that skipped. A
  split with no images, or none readable, is a `DataError` (`empty_split`): nothing
  to score, index or draw."""
  count = len(source.image_ids) if limit <= 0 else min(limit, len(source.image_ids))
  if not count:
    raise empty_split_error(source.split, source.listing)
  skipped_before = source.report.total
  yielded = 0
  for index in range(count):
    try:
      example = source.read(index)
      objects = image_objects(example, max_regions, source.location)
    except errors.DataError as e:
      errors.apply_policy(e, on_error, source.report)
      continue
    yielded += 1
    yield example, objects
  if source.report.total > skipped_before:
    source.report.log()
  if not yielded:
    raise errors.DataError(source.listing, f"split {source.split!r}: none of its "
                           f"{count} images could be read (each skipped, as logged)",
                           kind="empty_split")
