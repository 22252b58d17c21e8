"""A TFDS dataset of the released VinVL/Oscar retrieval data, for random access.

`vinvl_retrieval` (configs `coco`, `flickr30k`, `demo`) reads the released layout
(`features.tsv`, `predictions.tsv`, `{split}_captions.*`, `{split}_img_keys.tsv`, see
`readers.py`) from the manual directory and writes one record per image:

  image_id  text            the canonical id (decimal ids without leading zeros)
  tags      sequence(text)  detector labels in `predictions.tsv` order
  regions   [n, D] float16  region features (raw bytes), boxes canonical
  boxes     [n, 6] float32  the box dims of the regions, full precision
  captions  sequence(text)  the image's captions

Records keep the split's key-file order (shuffling is disabled), so record i is image
i of `{split}_img_keys.tsv` (images skipped under `on_error='skip'` left out), and the
files are array_record: `tfds.data_source` (or
`builder.as_data_source`) reads any record by index, which is what the index-based
input pipeline (`pipeline.py`, `data_source='tfds'`) needs.

Precision: regions are stored as float16, half the size of the released float32 (COCO:
about 25 GB instead of 50). float16 keeps 11 significant bits: a relative error of at
most 2**-11 (0.05%) on every feature (an absolute one of at most 2**-25 below 6e-5,
float16's subnormal range), well below what bfloat16 compute (8 bits, the trainer's
default dtype) rounds away at the first layer. The box dims are stored again at
float32 and `read_record` puts them back, so boxes are exact. A value outside the
float16 range (|x| > 65504) is a `DataError`.

The split's image ids and caption counts are also written to the dataset's
`metadata.json`, so the pipeline can lay out its example stream without reading every
record.

  build_tfds("data/coco_ir", "data/tfds", "coco")   # -> data/tfds/vinvl_retrieval/coco/1.0.0
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from vldeformer_jax.data import errors, readers

logger = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(eq=False)
class VinVLRetrievalConfig(tfds.core.BuilderConfig):
  """Which splits to look for and how to read the features.

  splits: candidate split names; those whose captions file exists are built.
  feature_dim: dims per region in `features.tsv` (2048 detector + 6 box).
  box_order: the stored box order ("auto" detects it); records are canonical.
  on_error: "error" or "skip" (see `readers.VinVLRetrievalData`).
  """

  splits: tuple[str, ...] = ("train", "minival", "test")
  feature_dim: int = readers.DEFAULT_FEATURE_DIM
  box_order: str = "auto"
  on_error: str = "error"


BUILDER_CONFIGS = (
    VinVLRetrievalConfig(name="coco", description="VinVL COCO retrieval (coco_ir).",
                         splits=("train", "minival", "test")),
    VinVLRetrievalConfig(name="flickr30k",
                         description="VinVL Flickr30k retrieval (flickr30k_ir).",
                         splits=("train", "minival", "test")),
    VinVLRetrievalConfig(name="demo", description="The synthetic demo dataset "
                         "(vldeformer_jax.data.synthetic).", splits=("train", "test")),
)


class VinvlRetrieval(tfds.core.GeneratorBasedBuilder):
  """The released VinVL retrieval data, one record per image, key-file order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = list(BUILDER_CONFIGS)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the released VinVL/Oscar retrieval folder (coco_ir, flickr30k_ir, or a "
      "folder written by `python -m vldeformer_jax.data.synthetic`) in the manual "
      "dir: features.tsv (+ .lineidx), imageid2idx.json, predictions.tsv, "
      "{split}_captions.pt or .json, {split}_img_keys.tsv.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default locates the module through `importlib_resources`, a package it
    # does not declare (absent here); this file is the answer it would compute.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    dim = self.builder_config.feature_dim
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image_id": tfds.features.Text(),
            "tags": tfds.features.Sequence(tfds.features.Text()),
            "regions": tfds.features.Tensor(shape=(None, dim), dtype=np.float16,
                                            encoding=tfds.features.Encoding.BYTES),
            "boxes": tfds.features.Tensor(shape=(None, readers.NUM_BOX_DIMS),
                                          dtype=np.float32),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }),
        disable_shuffling=True,  # Record i = line i of the key file.
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/microsoft/Oscar",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = Path(dl_manager.manual_dir)
    present = [s for s in self.builder_config.splits
               if (manual_dir / f"{s}_captions.json").is_file()
               or (manual_dir / f"{s}_captions.pt").is_file()]
    if not present:
      raise FileNotFoundError(
          f"{manual_dir}: no captions file for any of the splits "
          f"{self.builder_config.splits} ({{split}}_captions.pt or .json)")
    self.info.metadata["box_order"] = readers.CANONICAL_BOX_ORDER
    self.info.metadata["splits"] = {}
    cfg = self.builder_config
    generators = {}
    for split in present:
      data = readers.VinVLRetrievalData(manual_dir, split, feature_dim=cfg.feature_dim,
                                        box_order=cfg.box_order, on_error=cfg.on_error)
      if not len(data):  # TFDS cannot write an empty split.
        logger.warning("%s: split %r has no images; not built", manual_dir, split)
        continue
      generators[split] = self._generate_examples(data, split)
    return generators

  def _generate_examples(self, data: readers.VinVLRetrievalData, split: str
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    image_ids, num_captions = [], []
    for example in data.examples():
      record = to_record(example, data.features.path)
      image_ids.append(example.image_id)
      num_captions.append(len(example.captions))
      yield len(image_ids) - 1, record
    self.info.metadata["splits"][split] = {
        "image_ids": image_ids, "num_captions": num_captions,
        "source_box_order": data.features.box_order,
        "skipped": data.report.summary()}


def to_record(example: readers.RetrievalExample, features_path: str | os.PathLike
              ) -> dict[str, Any]:
  """A `RetrievalExample` as a record of the dataset (regions rounded to float16)."""
  regions = example.regions
  if regions.size and np.abs(regions).max() > FLOAT16_MAX:
    region, dim = (int(v[0]) for v in np.nonzero(np.abs(regions) > FLOAT16_MAX))
    raise errors.DataError(
        features_path, f"value {regions[region, dim]} in region {region} dim {dim} is "
        "outside the float16 range of the TFDS records", kind="float16_range",
        key=example.image_id)
  return {"image_id": example.image_id, "tags": list(example.tags),
          "regions": regions.astype(np.float16),
          "boxes": np.asarray(example.boxes, np.float32),
          "captions": list(example.captions)}


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_record(record: Mapping[str, Any], dtype: type = np.float32
                ) -> readers.RetrievalExample:
  """A decoded record -> `RetrievalExample`: float32 regions with the exact box dims,
  or (`dtype=np.float16`) the stored float16 features with the boxes rounded to it."""
  regions = np.asarray(record["regions"], dtype).copy()
  boxes = np.asarray(record["boxes"], np.float32)
  if regions.shape[0] != boxes.shape[0]:
    raise ValueError(f"record of image {_text(record['image_id'])}: {regions.shape[0]} "
                     f"regions but {boxes.shape[0]} boxes")
  if len(regions):
    regions[:, -readers.NUM_BOX_DIMS:] = boxes
  return readers.RetrievalExample(
      image_id=_text(record["image_id"]),
      captions=[_text(c) for c in record["captions"]],
      tags=[_text(t) for t in record["tags"]],
      regions=regions, boxes=regions[:, -readers.NUM_BOX_DIMS:])


def build_tfds(data_dir_raw: str | os.PathLike, out_dir: str | os.PathLike,
               config_name: str = "demo", *, feature_dim: int | None = None,
               box_order: str | None = None, on_error: str | None = None) -> Path:
  """Builds `vinvl_retrieval/<config_name>` from the released layout in `data_dir_raw`.

  `feature_dim`, `box_order` and `on_error` override the named config (e.g. a demo
  dataset written with a small feature_dim). Returns the dataset directory
  (`out_dir/vinvl_retrieval/<config_name>/<version>`), the path the pipeline's
  `data_source='tfds'` takes as `data_dir`. An existing build is reused.
  """
  by_name = {c.name: c for c in BUILDER_CONFIGS}
  if config_name not in by_name:
    raise ValueError(f"config_name must be one of {tuple(by_name)}, got {config_name!r}")
  overrides = {k: v for k, v in (("feature_dim", feature_dim), ("box_order", box_order),
                                 ("on_error", on_error)) if v is not None}
  if "box_order" in overrides:
    errors.check_choice("box_order", box_order, ("auto",) + readers.BOX_ORDERS)
  if "on_error" in overrides:
    errors.check_choice("on_error", on_error, errors.ON_ERROR_POLICIES)
  base = by_name[config_name]
  overrides = {k: v for k, v in overrides.items() if getattr(base, k) != v}
  # TFDS refuses a custom config named like a registered one: the name says what differs.
  name = "_".join([config_name] + [f"{k}-{v}" for k, v in overrides.items()])
  config = dataclasses.replace(base, name=name, **overrides) if overrides else base
  builder = VinvlRetrieval(data_dir=os.fspath(out_dir), config=config,
                           file_format=FILE_FORMAT)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(data_dir_raw),
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return Path(os.fspath(builder.data_path))


def load_builder(dataset_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """The built dataset in `dataset_dir` (as returned by `build_tfds`), read-only."""
  path = Path(dataset_dir)
  if not (path / "dataset_info.json").is_file():
    found = sorted(p.parent for p in path.glob("**/dataset_info.json"))
    if len(found) != 1:
      raise FileNotFoundError(
          f"{path}: not a built TFDS dataset directory (no dataset_info.json) and "
          f"{len(found)} below it" + (f": {[str(f) for f in found]}" if found else ""))
    path = found[0]
  return tfds.builder_from_directory(os.fspath(path))


def split_index(builder: tfds.core.DatasetBuilder, split: str
                ) -> tuple[list[str], np.ndarray]:
  """(image ids, caption count per image) of a built split, from its metadata."""
  splits = (builder.info.metadata or {}).get("splits", {})
  if split not in splits:
    raise ValueError(f"{builder.data_dir}: no split {split!r} (built: "
                     f"{sorted(splits)})")
  entry = splits[split]
  return list(entry["image_ids"]), np.asarray(entry["num_captions"], np.int64)
