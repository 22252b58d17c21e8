"""The input pipeline: training batches with bimodal hard negatives, and eval sets.

Training stream. The examples of the split form a global stream, the concatenation of
epochs; epoch e is a permutation of the split drawn from (seed, e). An example is an
image with one caption: with `caption_sampling='per_image'` each image appears once
per epoch with a caption drawn from (seed, e, image); with 'all_pairs' each (image,
caption) pair appears once per epoch. With `batch_grouping='shared_tags'` the
permutation keeps together the images whose distinct object tags are the same set: the
groups come in random order, their members (and, under 'all_pairs', their pairs) in
random order within them, so consecutive rows, hence in-batch negatives, are often
images with the same objects, told apart only by their region features (attributes,
layout) and their captions: harder negatives for the same batch size, the lever that
makes an encoder read the regions where tags alone separate most of a random batch
(the demo data is built that way). On real detections the groups are small (few images
share an exact tag set) and the stream is close to a random one. A global batch is
`batch_size` consecutive stream positions; process p of P takes its contiguous share
of `batch_size // P` rows.

Hard negatives are drawn within negative groups, the "mini-batch" of the paper: the
global batch is cut into consecutive groups of G rows, G = `negative_group_size`
(0, the default, means G = the process's share, `batch_size // P`; a positive G must
divide the share, so a process never reads rows outside its share). An image
negative takes replacement objects from the other images of its row's group; a text
negative's nouns become tags drawn from the group's distinct tags
(`text_negative_tags='batch'`, the default, which mirrors the released code's draw
from the whole tag vocabulary) or from the image's own tags ('image': harder, the
negative names only objects that are in the image). Everything random is a function
of the seed and global stream positions, never of process-local indices:

  text negative of the row at position s       rng(seed, s), tags of its group
  image negatives of a group starting at s     rng(seed, s), over that group's rows

so a batch is a pure function of where it starts and of G. With a fixed positive G,
the global batch (positives and negatives) is the same for any process count that G
divides the share of: the P shares concatenate to the 1-process batch, byte for byte.
With G = 0 the groups follow the shares, so the negatives change with the process
count (the positives do not).

The iterator's state is the stream position of the next global batch
(`get_state`/`set_state`), and a resumed iterator produces exactly the batches an
uninterrupted one would; the position, not a batch count, is stored, so a run may
resume with another process count or batch size (the positives are then the same;
the negatives too when G is fixed and the global batch size unchanged).

Batches are built ahead on a few worker threads and handed out in stream order. A
build reads the split prepared once by `prepared.py` (from the raw layout or the TFDS
build; prepared on first use, or by `bin/build_data`): per row a caption template, tag
ids and float16 region rows memory-mapped from disk. What is left per batch is small:
the random draws (a few per row, NumPy's Generator, as before), filling each template's
slots (`negatives.fill_text_negative`), index arithmetic for the image negatives
(`negatives.swap_objects`, then one NumPy gather from the positive rows), WordPiece
tokenization of captions (Rust; the tags' ids come from a per-tag table) and copies
into the padded arrays. Being a pure function of its position, a batch is the same
whichever thread builds it and when, and it is the batch the pipeline built from the
files before the prepared split existed, with regions rounded to float16 (checked by
`benchmarks/bench_pipeline.py` on every run). Regions are float16 end to end: half the
bytes to copy and to send to the device, and what the TFDS build stored already.

Threads or processes. Profiled at the paper's shapes (1,024 rows, 50 regions, both
negatives), one core builds a batch in about 0.5 s, about half of it Python that holds
the GIL (the draws, template fills, index arithmetic, token lists) and half copies and
tokenization that release it. Threads (`pipeline_workers`, the default) overlap the
two halves, so the Python half bounds them at about 4,000 pairs/s whatever the cores.
`pipeline_processes > 0` builds in that many spawned processes instead, each with its
own `TrainPipeline` over the same prepared split, handing each batch over in a new
shared-memory block that this process copies out of: no GIL bound, but two more
passes over each batch (~420 MB at the paper's shapes, into fresh pages). On a shared
2-core machine threads were about twice as fast as processes (see BENCHMARKS.md);
processes are for hosts whose cores outnumber what the GIL lets threads use.

Why not `tf.data` graph ops (or `grain`). The negatives are defined by NumPy
Generator streams `rng(seed, tag, position)` and by word-level rules (WordNet
antonyms, inflection, "a"/"an"); rewriting the draws as TF ops would change every
negative and re-open the determinism and process-count guarantees, for the part of a
batch that is now the smaller one. `tf.data` with `numpy_function` gains nothing over
threads (the same Python under the same GIL), and freeing its iterator while a call
waits for the GIL deadlocks (e.g. on `set_state`, at exit). `grain` is not installed
here; worker processes over a pure `build_batch(position)` give what it would
(parallel, deterministic, resumable by position) in a few lines.

An image's objects are (tag k, region row k) of `predictions.tsv` and `features.tsv`,
in file order, cut to the first `max_regions`; the image's tag string is their tags
joined by spaces. The same cut applies to the positive, its hard negative and the eval
set, so the three see images alike. An image whose tag and region counts differ, or
with a bad row, is a `DataError` (recorded when the split is prepared, raised when the
stream reaches it); under `on_error='skip'` it is recorded in the pipeline's
`SkipReport` (`report`) and replaced by a substitute drawn from (seed, position), so
shapes, determinism and resumption are kept.

Sources (`config.data_source`): 'raw' reads the released layout in `config.data_dir`
(`readers.py`); 'tfds' reads the dataset `bin/build_data --tfds` (or
`tfds_builder.build_tfds`) wrote (`config.data_dir` is its directory). Prepared splits
go to `config.prepared_dir` (default: beside the data).

Config keys read: data_source, data_dir, train_split, feature_dim, box_order,
caption_sampling, batch_grouping, on_error, hard_negatives, text_negative_ratio,
image_negative_ratio, text_negative_tags, negative_group_size, batch_size, seed,
max_text_len, max_tag_len, max_regions, eval_max_images, pipeline_workers,
pipeline_processes, prefetch_batches, prepared_dir, prepare_workers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import multiprocessing
import os
import threading
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import numpy as np

from vldeformer_jax import image_negatives, negatives
from vldeformer_jax.data import prepared, readers
from vldeformer_jax.data.eval_set import EvalSet
from vldeformer_jax.data.sources import DATA_SOURCES, SourceSpec, image_objects
from vldeformer_jax.inputs import Batch, InputBuilder

logger = logging.getLogger(__name__)

TEXT_KEYS = ("input_ids", "token_type_ids", "position_ids", "token_mask")
IMAGE_KEYS = TEXT_KEYS + ("regions", "region_mask")
CAPTION_SAMPLING = ("per_image", "all_pairs")
BATCH_GROUPING = ("none", "shared_tags")
TEXT_NEGATIVE_TAGS = ("batch", "image")
STATE_VERSION = 1
# Keys the saved state gained later: a state saved before holds their old behaviour.
_STATE_DEFAULTS = {"batch_grouping": "none"}
MAX_SUBSTITUTES = 64

# Stream tags: each use of randomness draws from its own rng(seed, tag, ...).
_PERMUTATION, _CAPTION, _TEXT_NEGATIVE, _IMAGE_NEGATIVE, _SUBSTITUTE = range(5)


def _rng(seed: int, tag: int, *words: int) -> np.random.Generator:
  return np.random.default_rng([seed, tag, *words])


# ----------------------------------------------------------------------------------
# Options: the config keys this module reads, checked once.


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """The pipeline's config values, validated (lengths agree with the model config)."""

  data_source: str
  data_dir: str
  feature_dim: int
  box_order: str
  on_error: str
  caption_sampling: str
  batch_grouping: str
  hard_negatives: bool
  text_negative_ratio: float
  image_negative_ratio: float
  text_negative_tags: str
  negative_group_size: int  # Rows per negative group; 0: the process's share.
  batch_size: int
  seed: int
  workers: int  # Threads building batches.
  processes: int  # Processes building batches instead (0: threads).
  prefetch: int  # Batches built ahead beyond one per worker.
  prepared_dir: str  # Where prepared splits live ('': beside the data).
  prepare_workers: int  # Processes preparing a split (0: in this process).
  max_text_len: int
  max_tag_len: int
  max_regions: int


def _bad(key: str, value: Any, why: str) -> ValueError:
  return ValueError(f"config.{key}={value!r}: {why}")


def _int(config: ml_collections.ConfigDict, key: str, default: Any = None,
         minimum: int = 0) -> int:
  value = config.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise _bad(key, value, f"must be an integer >= {minimum}")
  return int(value)


def _choice(config: ml_collections.ConfigDict, key: str, choices: Sequence[str],
            default: Any = None) -> str:
  value = config.get(key, default)
  if value not in choices:
    raise _bad(key, value, f"must be one of {tuple(choices)}")
  return value


def _ratio(config: ml_collections.ConfigDict, key: str) -> float:
  value = config.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise _bad(key, value, "must be a number in [0, 1]")
  return float(value)


def pipeline_options(config: ml_collections.ConfigDict, inputs: InputBuilder | None
                     ) -> PipelineOptions:
  """Reads and checks the pipeline's config keys; a bad value names `config.KEY`."""
  data_dir = config.get("data_dir")
  if not data_dir:
    raise _bad("data_dir", data_dir, "is not set")
  if not Path(data_dir).is_dir():
    raise _bad("data_dir", data_dir, "is not a directory")
  feature_dim = _int(config, "feature_dim", minimum=readers.NUM_BOX_DIMS + 1)
  lengths = {k: _int(config, k, minimum=1) for k in
             ("max_text_len", "max_tag_len", "max_regions")}
  if inputs is not None:
    model = inputs.config
    for key in lengths:
      if lengths[key] != getattr(model, key):
        raise _bad(key, lengths[key], f"differs from the model config's {key}="
                   f"{getattr(model, key)} that the tokenized inputs follow")
    if feature_dim != model.img_feature_dim:
      raise _bad("feature_dim", feature_dim, f"differs from the model's img_feature_dim="
                 f"{model.img_feature_dim}")
  hard = config.get("hard_negatives")
  if not isinstance(hard, (bool, np.bool_)):
    raise _bad("hard_negatives", hard, "must be True or False")
  batch_size = _int(config, "batch_size", minimum=1)
  seed = _int(config, "seed", minimum=0)
  return PipelineOptions(
      data_source=_choice(config, "data_source", DATA_SOURCES, "raw"),
      data_dir=str(data_dir), feature_dim=feature_dim,
      box_order=_choice(config, "box_order", ("auto",) + readers.BOX_ORDERS),
      on_error=_choice(config, "on_error", readers.ON_ERROR_POLICIES),
      caption_sampling=_choice(config, "caption_sampling", CAPTION_SAMPLING),
      batch_grouping=_choice(config, "batch_grouping", BATCH_GROUPING, "none"),
      hard_negatives=bool(hard),
      text_negative_ratio=_ratio(config, "text_negative_ratio"),
      image_negative_ratio=_ratio(config, "image_negative_ratio"),
      text_negative_tags=_choice(config, "text_negative_tags", TEXT_NEGATIVE_TAGS,
                                 "batch"),
      negative_group_size=_int(config, "negative_group_size", 0),
      batch_size=batch_size, seed=seed,
      workers=_int(config, "pipeline_workers", min(4, os.cpu_count() or 1), minimum=1),
      processes=_int(config, "pipeline_processes", 0),
      prefetch=_int(config, "prefetch_batches", 1),
      prepared_dir=str(config.get("prepared_dir") or ""),
      prepare_workers=_int(config, "prepare_workers", os.cpu_count() or 1),
      **lengths)


def source_spec(options: PipelineOptions, split: str) -> SourceSpec:
  """The `SourceSpec` of a split under these options."""
  return SourceSpec(options.data_source, options.data_dir, split, options.feature_dim,
                    options.box_order, options.on_error)


def open_prepared(options: PipelineOptions, split: str) -> prepared.PreparedSplit:
  """The split prepared for training (`prepared.py`), preparing it when missing."""
  return prepared.open_prepared(source_spec(options, split), options.prepared_dir or None,
                                workers=options.prepare_workers)


# ----------------------------------------------------------------------------------
# The example stream.


class ExampleStream:
  """Stream position -> (image index, caption index); see the module docstring."""

  def __init__(self, num_captions: np.ndarray, sampling: str, seed: int,
               groups: np.ndarray | None = None):
    """`groups[i]`: image i's group (`shared_tag_groups`); None: a plain permutation."""
    if not len(num_captions):
      raise ValueError("the split has no images")
    self.num_captions = np.asarray(num_captions, np.int64)
    self.sampling = sampling
    self.seed = seed
    self.first_caption = np.concatenate([[0], np.cumsum(self.num_captions)])
    self.epoch_size = (len(self.num_captions) if sampling == "per_image"
                       else int(self.first_caption[-1]))
    if groups is not None:
      groups = np.asarray(groups, np.int64)
      if groups.shape != self.num_captions.shape:
        raise ValueError(f"groups has shape {groups.shape}, expected one per image "
                         f"{self.num_captions.shape}")
      if sampling == "all_pairs":  # The group of each (image, caption) item.
        groups = np.repeat(groups, self.num_captions)
    self.groups = groups
    self._permutations: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict())
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._permutations.get(epoch)
      if perm is None:
        perm = self._draw_permutation(epoch)
        self._permutations[epoch] = perm
        while len(self._permutations) > 4:
          self._permutations.popitem(last=False)
      return perm

  def _draw_permutation(self, epoch: int) -> np.ndarray:
    rng = _rng(self.seed, _PERMUTATION, epoch)
    if self.groups is None:
      return rng.permutation(self.epoch_size)
    group_rank = rng.permutation(int(self.groups.max()) + 1)  # Random group order,
    within = rng.random(self.epoch_size)                      # random order inside.
    return np.lexsort((within, group_rank[self.groups]))

  def example(self, position: int) -> tuple[int, int]:
    """(image index, caption index) at a stream position."""
    epoch, offset = divmod(int(position), self.epoch_size)
    k = int(self.permutation(epoch)[offset])
    if self.sampling == "per_image":
      caption = int(_rng(self.seed, _CAPTION, epoch, k).integers(self.num_captions[k]))
      return k, caption
    image = int(np.searchsorted(self.first_caption, k, side="right")) - 1
    return image, k - int(self.first_caption[image])

  def substitute(self, position: int, attempt: int) -> tuple[int, int]:
    """A replacement example for a bad one at `position` (attempt 0, 1, ...)."""
    rng = _rng(self.seed, _SUBSTITUTE, int(position), attempt)
    image = int(rng.integers(len(self.num_captions)))
    return image, int(rng.integers(self.num_captions[image]))


def shared_tag_groups(split: prepared.PreparedSplit, max_regions: int) -> np.ndarray:
  """int64 [images]: a group id per image, equal for images whose distinct object tags
  (of the first `max_regions` objects, those the model sees) are the same set, order
  and repeats aside; numbered by first appearance."""
  keys = [tuple(np.unique(split.tag_ids(i)[:max_regions]).tolist())
          for i in range(len(split.image_ids))]
  ids: dict[tuple[int, ...], int] = {}
  return np.array([ids.setdefault(k, len(ids)) for k in keys], np.int64)


# ----------------------------------------------------------------------------------
# Training batches.


def _arrays(batch: Batch) -> dict[str, np.ndarray]:
  """The arrays of a `Batch` by name, not copied (`Batch.as_dict` deep-copies them)."""
  return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
          if getattr(batch, f.name) is not None}


def _fixed_batch(inputs: InputBuilder, seqs, length: int, regions=None,
                 num_regions: int | None = None, rows: int | None = None
                 ) -> dict[str, np.ndarray]:
  return _arrays(inputs.batch(seqs, regions, length=length, num_regions=num_regions,
                              rows=rows))


class TrainPipeline:
  """The training iterator: this process's share of each global batch, as NumPy.

  `__next__` yields `{"text": ..., "image": ..., ["neg_text", "neg_image"]}` (see
  `batch_spec`); `get_state`/`set_state` save and restore the stream position;
  `build_batch(position)` builds one share synchronously and `rows(position)` says
  which (image id, caption index) its rows hold.
  """

  def __init__(self, options: PipelineOptions, split: prepared.PreparedSplit,
               inputs: InputBuilder, process_index: int, process_count: int):
    if not isinstance(process_count, int) or process_count < 1:
      raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got "
                       f"{process_index!r}")
    if options.batch_size % process_count:
      raise _bad("batch_size", options.batch_size, f"is not divisible by the "
                 f"{process_count} processes")
    self.local_batch = options.batch_size // process_count
    group = options.negative_group_size
    if group and self.local_batch % group:
      raise _bad("negative_group_size", group, f"must divide the {self.local_batch} "
                 f"rows per process (config.batch_size={options.batch_size} over "
                 f"{process_count} process(es)), so that no negative group spans two "
                 "processes")
    if options.hard_negatives and group == 1:
      raise _bad("negative_group_size", group, "image hard negatives draw objects "
                 "from the other rows of the group, so it needs >= 2 (or 0: the "
                 "process's share)")
    if options.hard_negatives and self.local_batch < 2:
      raise _bad("batch_size", options.batch_size, f"gives {self.local_batch} row(s) per "
                 "process; image hard negatives draw objects from the other rows of "
                 "the process's share, so it needs >= 2")
    # Rows per negative group; groups tile the global batch and each share.
    self.group_size = group or self.local_batch
    self.options = options
    self.split = split
    self.report = readers.SkipReport()  # Bad images met under on_error='skip'.
    self.inputs = inputs
    # WordPiece ids of each vocabulary tag: an image's tag string is the tags joined by
    # spaces, and BERT's tokenizer splits at spaces first, so its ids are the tags' ids
    # concatenated (tokenized once here, not per batch).
    self._tag_tokens = inputs.tokenize(split.vocab)
    self.process_index = process_index
    self.process_count = process_count
    groups = (shared_tag_groups(split, options.max_regions)
              if options.batch_grouping == "shared_tags" else None)
    self.stream = ExampleStream(split.num_captions, options.caption_sampling,
                                options.seed, groups)
    self.position = 0  # Stream position of the next global batch to yield.
    self._prefetcher: OrderedPrefetcher | None = None
    self._lock = threading.Lock()

  # Structure.
  def batch_spec(self) -> dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]]:
    """Part -> key -> (shape, dtype) of every array in a batch."""
    o, b = self.options, self.local_batch
    text = {k: ((b, o.max_text_len), np.dtype(np.int32)) for k in TEXT_KEYS}
    image = {k: ((b, o.max_tag_len), np.dtype(np.int32)) for k in TEXT_KEYS}
    image["regions"] = ((b, o.max_regions, o.feature_dim), np.dtype(np.float16))
    image["region_mask"] = ((b, o.max_regions), np.dtype(np.int32))
    spec = {"text": text, "image": image}
    if o.hard_negatives:
      spec["neg_text"], spec["neg_image"] = dict(text), dict(image)
    return spec

  @property
  def epoch_size(self) -> int:
    """Examples per epoch (images, or image-caption pairs with 'all_pairs')."""
    return self.stream.epoch_size

  def share_start(self, position: int) -> int:
    """Stream position of this process's first row in the global batch at `position`."""
    return int(position) + self.process_index * self.local_batch

  # Building one share.
  def _resolve(self, position: int) -> tuple[int, int]:
    """(image, caption) at a stream position, substituted under on_error='skip'."""
    image, caption = self.stream.example(position)
    attempt = 0
    while True:
      error = self.split.errors.get(image)
      if error is None:
        return image, caption
      if self.options.on_error == "error":
        raise error
      with self._lock:
        self.report.record(error)
      if attempt == MAX_SUBSTITUTES:
        raise readers.DataError(
            self.options.data_dir, f"no good substitute found in {MAX_SUBSTITUTES} "
            f"draws for the bad example at stream position {position}; see the skip "
            f"report: {self.report.summary()}", kind="too_many_bad")
      image, caption = self.stream.substitute(position, attempt)
      attempt += 1

  def rows(self, position: int) -> list[tuple[str, int]]:
    """(image id, caption index) of each row of this process's share."""
    start = self.share_start(position)
    return [(self.split.image_ids[image], caption) for image, caption in
            map(self._resolve, range(start, start + self.local_batch))]

  def _tokens(self, seqs, length: int) -> dict[str, np.ndarray]:
    return _arrays(self.inputs.batch(seqs, length=length))

  def _image_tokens(self, tag_ids: np.ndarray):
    """The image side's token sequence for objects with these vocabulary tag ids."""
    tokens = self._tag_tokens
    return self.inputs.image_tokens(
        list(itertools.chain.from_iterable(tokens[k] for k in tag_ids.tolist())))

  def build_batch(self, position: int) -> dict[str, dict[str, np.ndarray]]:
    """This process's share of the global batch starting at stream `position`.

    Rows read the prepared split: caption templates, tag ids, float16 region rows
    copied straight into the padded batch. Negatives per group: the text negative
    fills the row's caption template (`negatives.fill_text_negative`), the image
    negative's draws are indices (`negatives.swap_objects`) and its regions one
    gather from the positive batch, whose rows are the group's objects.
    """
    o, split, b, r = self.options, self.split, self.local_batch, self.options.max_regions
    start = self.share_start(position)
    rows = [self._resolve(p) for p in range(start, start + b)]
    tag_ids = [split.tag_ids(image)[:r] for image, _ in rows]
    sizes = np.array([len(t) for t in tag_ids], np.int64)
    templates = [split.template(image, caption) for image, caption in rows]
    captions = [t.caption for t in templates]
    vocab = split.vocab
    regions = np.zeros((b, r, o.feature_dim), np.float16)
    for i, (image, _) in enumerate(rows):
      regions[i, :sizes[i]] = split.regions(image, r)
    region_mask = (np.arange(r) < sizes[:, None]).astype(np.int32)
    inputs = self.inputs
    batch = {
        "text": self._tokens(inputs.text_sequences(captions), o.max_text_len),
        "image": {**self._tokens([self._image_tokens(ids) for ids in tag_ids],
                                 o.max_tag_len),
                  "regions": regions, "region_mask": region_mask}}
    if not o.hard_negatives:
      return batch
    neg_captions, neg_tag_ids = [], []
    # Image negatives: neg_regions[dest] = regions[src], (row, object) index pairs.
    dest_row, dest_obj, src_row, src_obj = [], [], [], []
    for first in range(0, b, self.group_size):
      # The group of rows [first, first + G) of the share, at stream positions from
      # group_start: its rng words are global positions, the same on any process.
      group = slice(first, first + self.group_size)
      group_start = start + first
      group_ids = np.concatenate(tag_ids[group])
      if o.text_negative_tags == "batch":
        pool = sorted(vocab[k] for k in np.unique(group_ids).tolist())
        row_tags = [pool] * self.group_size
      else:
        row_tags = [[vocab[k] for k in ids.tolist()] for ids in tag_ids[group]]
      neg_captions += [
          negatives.fill_text_negative(t, row_tags[i], _rng(
              o.seed, _TEXT_NEGATIVE, group_start + i), o.text_negative_ratio).text
          for i, t in enumerate(templates[group])]
      mentioned = np.zeros((self.group_size, len(vocab)), bool)
      for i, (image, caption) in enumerate(rows[group]):
        mentioned[i, split.mentioned_ids(image, caption)] = True
      swaps = image_negatives.swap_objects(sizes[group], group_ids, mentioned,
                                           _rng(o.seed, _IMAGE_NEGATIVE, group_start),
                                           o.image_negative_ratio)
      group_first = np.concatenate([[0], np.cumsum(sizes[group])])
      for i, source in enumerate(swaps.source):
        neg_tag_ids.append(group_ids[group_first[source[:, 0]] + source[:, 1]])
        dest_row.append(np.full(len(source), first + i))
        dest_obj.append(np.arange(len(source)))
        src_row.append(first + source[:, 0])
        src_obj.append(source[:, 1])
    neg_regions = np.zeros_like(regions)
    if dest_row:
      dest = np.concatenate(dest_row), np.concatenate(dest_obj)
      neg_regions[dest] = regions[np.concatenate(src_row), np.concatenate(src_obj)]
    batch["neg_text"] = self._tokens(inputs.text_sequences(neg_captions), o.max_text_len)
    batch["neg_image"] = {
        **self._tokens([self._image_tokens(ids) for ids in neg_tag_ids], o.max_tag_len),
        "regions": neg_regions, "region_mask": region_mask.copy()}
    return batch

  # Iteration.
  def __iter__(self) -> "TrainPipeline":
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    if self._prefetcher is None:
      self._prefetcher = self._start_prefetcher()
    try:
      batch = self._prefetcher.next()
      if self.options.processes and self.split.errors:
        self.rows(self.position)  # Records the bad images met in this skip report.
    except BaseException:
      self.close()  # The next call starts over at the same position.
      raise
    self.position += self.options.batch_size
    return batch

  def _start_prefetcher(self) -> OrderedPrefetcher:
    o = self.options
    if not o.processes:
      executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=o.workers, thread_name_prefix="vld-input")
      return OrderedPrefetcher(executor, self.build_batch, self.position, o.batch_size,
                               o.workers + o.prefetch)
    # Spawned, not forked: this process holds threads (JAX, TF, tokenizers).
    executor = concurrent.futures.ProcessPoolExecutor(
        o.processes, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(o, str(self.split.path), self.split.spec, self.inputs,
                  self.process_index, self.process_count))
    return OrderedPrefetcher(executor, _build_shared, self.position, o.batch_size,
                             o.processes + o.prefetch, _take_shared, _free_shared)

  def close(self) -> None:
    """Stops building ahead (a later `next` starts again)."""
    if self._prefetcher is not None:
      self._prefetcher.close()
      self._prefetcher = None

  def get_state(self) -> dict[str, Any]:
    """JSON-able position of the next global batch, plus what defines the stream."""
    return {"version": STATE_VERSION, "position": self.position,
            "epoch": self.position // self.epoch_size,
            "seed": self.options.seed, "caption_sampling": self.options.caption_sampling,
            "batch_grouping": self.options.batch_grouping,
            "split": self.split.spec.split, "epoch_size": self.epoch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()`; refuses a state from a different stream."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise ValueError(f"not a pipeline state of version {STATE_VERSION}: {state!r}")
    mine = self.get_state()
    for key, config_key in (("seed", "seed"), ("caption_sampling", "caption_sampling"),
                            ("batch_grouping", "batch_grouping"),
                            ("split", "train_split"), ("epoch_size", "data_dir")):
      saved = state.get(key, _STATE_DEFAULTS.get(key))
      if saved != mine[key]:
        raise ValueError(
            f"cannot resume: the saved input state has {key}={saved!r} but this "
            f"pipeline has {mine[key]!r} (config.{config_key}); the example stream "
            "would differ")
    position = state.get("position")
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
      raise ValueError(f"bad position in the saved input state: {position!r}")
    self.close()
    self.position = position


class OrderedPrefetcher:
  """Submits `build(start + k * step)` for k = 0, 1, ... to `executor`, in order.

  Keeps `depth` builds in flight; `next()` returns `finish(result)` in order and
  re-raises a build's exception as it was raised. `close()` cancels what has not
  started and passes the results of builds that did to `discard` (shared memory to
  free), then shuts the executor down.
  """

  def __init__(self, executor: concurrent.futures.Executor, build: Callable[[int], Any],
               start: int, step: int, depth: int,
               finish: Callable[[Any], Any] = lambda r: r,
               discard: Callable[[Any], None] | None = None):
    self._executor = executor
    self._build = build
    self._next = int(start)
    self._step = int(step)
    self._depth = depth
    self._finish = finish
    self._discard = discard
    self._pending: collections.deque[concurrent.futures.Future] = collections.deque()

  def _fill(self) -> None:
    while len(self._pending) < self._depth:
      self._pending.append(self._executor.submit(self._build, self._next))
      self._next += self._step

  def next(self) -> Any:
    self._fill()
    result = self._finish(self._pending.popleft().result())
    self._fill()
    return result

  def close(self) -> None:
    for future in self._pending:
      future.cancel()
    if self._discard is not None:
      for future in self._pending:
        if not future.cancelled() and future.exception() is None:
          self._discard(future.result())
    self._pending.clear()
    self._executor.shutdown(wait=False, cancel_futures=True)


# Worker processes (config.pipeline_processes > 0): each holds its own TrainPipeline
# and hands a batch over in one shared-memory block, which the main process copies
# out of and frees.
_WORKER: TrainPipeline | None = None


def _init_worker(options: PipelineOptions, split_path: str, spec: SourceSpec,
                 inputs: InputBuilder, process_index: int, process_count: int) -> None:
  global _WORKER
  _WORKER = TrainPipeline(options, prepared.PreparedSplit(split_path, spec), inputs,
                          process_index, process_count)


def _build_shared(position: int) -> tuple[str, list[tuple]]:
  """`build_batch(position)` in a worker, written to a new shared-memory block."""
  batch = _WORKER.build_batch(position)
  arrays = [(part, key, v) for part in batch for key, v in batch[part].items()]
  block = shared_memory.SharedMemory(create=True,
                                     size=max(sum(v.nbytes for *_, v in arrays), 1))
  layout, offset = [], 0
  for part, key, value in arrays:
    np.ndarray(value.shape, value.dtype, block.buf, offset)[...] = value
    layout.append((part, key, value.shape, value.dtype.str, offset))
    offset += value.nbytes
  block.close()  # The main process unlinks it (the resource tracker is shared).
  return block.name, layout


def _take_shared(result: tuple[str, list[tuple]]) -> dict[str, dict[str, np.ndarray]]:
  """The batch `_build_shared` wrote, copied out; the block is freed."""
  name, layout = result
  block = shared_memory.SharedMemory(name=name)
  try:
    batch: dict[str, dict[str, np.ndarray]] = {}
    for part, key, shape, dtype, offset in layout:
      batch.setdefault(part, {})[key] = np.ndarray(shape, dtype, block.buf,
                                                   offset).copy()
  finally:
    block.close()
    block.unlink()
  return batch


def _free_shared(result: tuple[str, list[tuple]]) -> None:
  block = shared_memory.SharedMemory(name=result[0])
  block.close()
  block.unlink()


def make_train_iterator(config: ml_collections.ConfigDict, inputs: InputBuilder,
                        process_index: int, process_count: int) -> TrainPipeline:
  """The trainer's `TrainIterator` over `config.train_split` (see `TrainPipeline`)."""
  options = pipeline_options(config, inputs)
  split = config.get("train_split")
  if not isinstance(split, str) or not split:
    raise _bad("train_split", split, "must be a split name")
  return TrainPipeline(options, open_prepared(options, split), inputs, process_index,
                       process_count)


# ----------------------------------------------------------------------------------
# Evaluation.


def load_eval_set(config: ml_collections.ConfigDict, split: str) -> EvalSet:
  """Every image and caption of `split` once, in key-file order.

  With `config.eval_max_images > 0`, only the first that many images (and their
  captions). Objects are cut to `max_regions` as in training. Under
  `on_error='skip'` a bad image is left out (and reported).
  """
  options = pipeline_options(config, None)
  limit = _int(config, "eval_max_images", 0)
  source = source_spec(options, split).open()
  count = len(source.image_ids) if limit == 0 else min(limit, len(source.image_ids))
  image_ids, tags, regions, captions, owner = [], [], [], [], []
  for index in range(count):
    try:
      example = source.read(index)
      objects = image_objects(example, options.max_regions, source.location)
    except readers.DataError as e:
      if options.on_error == "error":
        raise
      source.report.record(e)
      continue
    captions += example.captions
    owner += [len(image_ids)] * len(example.captions)
    image_ids.append(example.image_id)
    tags.append(objects.tag_string)
    regions.append(objects.regions)
  if source.report.total:
    source.report.log()
  return EvalSet(image_ids, tags, regions, captions, np.asarray(owner, np.int64))


def num_eval_batches(num_items: int, batch_size: int) -> int:
  """Global batches needed for `num_items` (the same on every process)."""
  return math.ceil(num_items / batch_size)


def load_eval_split(data_dir: str, split: str, model_config: Any, *,
                    data_source: str = "raw", on_error: str = "error",
                    max_images: int = 0) -> EvalSet:
  """`load_eval_set` for a model: lengths and feature size from its `ModelConfig`; the
  training-only keys the options check get neutral values (no negatives, batch 1)."""
  config = ml_collections.ConfigDict(dict(
      data_source=data_source, data_dir=str(data_dir), feature_dim=model_config.img_feature_dim,
      box_order="auto", on_error=on_error, caption_sampling="per_image",
      hard_negatives=False, text_negative_ratio=0.0, image_negative_ratio=0.0,
      text_negative_tags="batch", negative_group_size=0, batch_size=1, seed=0,
      max_text_len=model_config.max_text_len, max_tag_len=model_config.max_tag_len,
      max_regions=model_config.max_regions, eval_max_images=max_images,
      pipeline_workers=1, prefetch_batches=1))
  return load_eval_set(config, split)


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
