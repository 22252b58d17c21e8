"""The training input pipeline: this process's share of each global batch, as NumPy.

The split, prepared once (`prepared.py`), forms a global stream of examples, the
concatenation of epochs: epoch e is a permutation of the split drawn from (seed, e),
an example an image with one caption (`caption_sampling`); `batch_grouping=
'shared_tags'` keeps images with the same set of object tags together, so in-batch
negatives often differ only in their regions. A global batch is `batch_size`
consecutive stream positions; process p of P takes its contiguous share. Bimodal hard
negatives are drawn within negative groups of `negative_group_size` rows: an image
negative takes objects from the group's other images, a text negative's nouns become
tags of the group ('batch') or of the image ('image'). Everything random is a
function of the seed and global stream positions, so a batch is a pure function of
where it starts: the same on any thread or worker process (`workers.py`), and a
resumed iterator (`get_state`/`set_state`: the stream position) yields exactly the
batches an uninterrupted one would. An image's objects are cut to `max_regions`, as
in the eval set (`eval_set.py`). A bad image raises its `DataError`, or under
`on_error='skip'` is counted in `report` and replaced by a substitute drawn from
(seed, position); preparing the split finds every bad image, so the trainer's
iterator (`make_train_iterator`) raises the first one, or logs the skip report, when
it is made, before any step runs. Options: `PipelineOptions` (the source keys:
`options.py`).

The design at length (the guarantees, the negatives' streams, what a batch costs,
threads or processes, why not tf.data): docs/input_pipeline.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import threading
from typing import Any

import ml_collections
import numpy as np

from vldeformer_jax import image_negatives, negatives
from vldeformer_jax.data import errors, prepared, workers
from vldeformer_jax.data.options import (SourceOptions, config_error, config_values,
                                         require_choice, require_flag, require_int,
                                         require_ratio, set_field)
from vldeformer_jax.data.sources import SourceSpec
from vldeformer_jax.inputs import InputBuilder

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
# The most threads, processes or batches ahead a config may ask for: each is one
# build in flight (a thread or process, a batch in memory), so a huge value would
# submit builds without end.
MAX_WORKERS = 256

# Stream tags: each use of randomness draws from its own rng(seed, tag, ...).
_PERMUTATION, _CAPTION, _TEXT_NEGATIVE, _IMAGE_NEGATIVE, _SUBSTITUTE = range(5)


def _rng(seed: int, tag: int, *words: int) -> np.random.Generator:
  return np.random.default_rng([seed, tag, *words])


# ----------------------------------------------------------------------------------
# Options: the config keys this module reads, checked once.


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineOptions(SourceOptions):
  """The pipeline's config values, checked when built; each field is the config key
  of its name (the source keys and their checks: `SourceOptions`)."""

  caption_sampling: str
  batch_grouping: str
  hard_negatives: bool
  text_negative_ratio: float
  image_negative_ratio: float
  text_negative_tags: str
  negative_group_size: int  # Rows per negative group; 0: the process's share.
  batch_size: int
  seed: int
  pipeline_workers: int  # Threads building batches.
  pipeline_processes: int  # Processes building batches instead (0: threads).
  prefetch_batches: int  # Batches built ahead beyond one per worker.
  prepared_dir: str  # Where prepared splits live ('': beside the data).
  prepare_workers: int  # Processes preparing a split (0: in this process).
  max_text_len: int
  max_tag_len: int

  def __post_init__(self):
    super().__post_init__()
    for field in ("max_text_len", "max_tag_len", "batch_size"):
      require_int(self, field, minimum=1)
    require_int(self, "pipeline_workers", minimum=1, maximum=MAX_WORKERS)
    for field in ("seed", "negative_group_size"):
      require_int(self, field)
    for field in ("pipeline_processes", "prefetch_batches", "prepare_workers"):
      require_int(self, field, maximum=MAX_WORKERS)
    require_flag(self, "hard_negatives")
    require_choice(self, "caption_sampling", CAPTION_SAMPLING)
    require_choice(self, "batch_grouping", BATCH_GROUPING)
    require_choice(self, "text_negative_tags", TEXT_NEGATIVE_TAGS)
    for field in ("text_negative_ratio", "image_negative_ratio"):
      require_ratio(self, field)
    set_field(self, "prepared_dir", str(self.prepared_dir or ""))


def pipeline_options(config: ml_collections.ConfigDict, inputs: InputBuilder | None
                     ) -> PipelineOptions:
  """Reads and checks the pipeline's config keys; a bad value names `--config.KEY`."""
  options = PipelineOptions(**config_values(config, PipelineOptions))
  if inputs is not None:
    model = inputs.config
    for key in ("max_text_len", "max_tag_len", "max_regions"):
      if getattr(options, key) != getattr(model, key):
        raise config_error(key, getattr(options, key), f"differs from the model "
                           f"config's {key}={getattr(model, key)} that the tokenized "
                           "inputs follow")
    if options.feature_dim != model.img_feature_dim:
      raise config_error("feature_dim", options.feature_dim, f"differs from the model's "
                         f"img_feature_dim={model.img_feature_dim}")
  return options


def open_prepared(options: PipelineOptions, split: str) -> prepared.PreparedSplit:
  """The split prepared for training (`prepared.py`), preparing it when missing."""
  return prepared.open_prepared(options.spec(split), options.prepared_dir or None,
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
      raise config_error("batch_size", options.batch_size, f"is not divisible by the "
                         f"{process_count} processes")
    self.local_batch = options.batch_size // process_count
    group = options.negative_group_size
    if group and self.local_batch % group:
      raise config_error("negative_group_size", group, f"must divide the "
                         f"{self.local_batch} rows per process (--config.batch_size="
                         f"{options.batch_size} over {process_count} process(es)), so "
                         "that no negative group spans two processes")
    if options.hard_negatives and group == 1:
      raise config_error("negative_group_size", group, "image hard negatives draw "
                         "objects from the other rows of the group, so it needs >= 2 "
                         "(or 0: the process's share)")
    if options.hard_negatives and self.local_batch < 2:
      raise config_error("batch_size", options.batch_size, f"gives {self.local_batch} "
                         "row(s) per process; image hard negatives draw objects from the "
                         "other rows of the process's share, so it needs >= 2")
    # Rows per negative group; groups tile the global batch and each share.
    self.group_size = group or self.local_batch
    self.options = options
    self.split = split
    self.report = errors.SkipReport()  # Bad images met under on_error='skip'.
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
    self._prefetcher: workers.OrderedPrefetcher | None = None
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
        raise errors.DataError(
            self.options.data_dir, f"no good substitute found in {MAX_SUBSTITUTES} "
            f"draws for the bad example at stream position {position}; see the skip "
            f"report: {self.report.summary()}", kind="too_many_bad")
      image, caption = self.stream.substitute(position, attempt)
      attempt += 1

  def check_bad_images(self) -> None:
    """The bad images that preparing the split found, reported now rather than when a
    batch first draws one: under on_error='error' the first of them (in split order)
    is raised, naming its file and line; under 'skip' all are recorded in `report`,
    which is logged."""
    bad = [error for _, error in sorted(self.split.errors.items())]
    if not bad:
      return
    if self.options.on_error == "error":
      first = bad[0]
      raise errors.DataError(
          first.path, f"{first.problem} (bad image 1 of {len(bad)} in split "
          f"{self.split.spec.split!r}; --config.on_error=skip leaves them out)",
          kind=first.kind, line=first.line, where=first.where, key=first.key)
    with self._lock:
      for error in bad:
        self.report.record(error)
    self.report.log()

  def rows(self, position: int) -> list[tuple[str, int]]:
    """(image id, caption index) of each row of this process's share."""
    start = self.share_start(position)
    return [(self.split.image_ids[image], caption) for image, caption in
            map(self._resolve, range(start, start + self.local_batch))]

  def _tokens(self, seqs, length: int) -> dict[str, np.ndarray]:
    return self.inputs.batch(seqs, length=length).as_dict()

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
    negative's draws are indices (`image_negatives.swap_objects`) and its regions one
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
      if self.options.pipeline_processes and self.split.errors:
        self.rows(self.position)  # Records the bad images met in this skip report.
    except BaseException:
      self.close()  # The next call starts over at the same position.
      raise
    self.position += self.options.batch_size
    return batch

  def _start_prefetcher(self) -> workers.OrderedPrefetcher:
    o = self.options
    if not o.pipeline_processes:
      return workers.thread_prefetcher(self.build_batch, self.position, o.batch_size,
                                       o.pipeline_workers, o.prefetch_batches)
    make = functools.partial(_worker_pipeline, o, str(self.split.path), self.split.spec,
                             self.inputs, self.process_index, self.process_count)
    return workers.process_prefetcher(make, self.position, o.batch_size,
                                      o.pipeline_processes, o.prefetch_batches)

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
            f"pipeline has {mine[key]!r} (--config.{config_key}); the example stream "
            "would differ")
    position = state.get("position")
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
      raise ValueError(f"bad position in the saved input state: {position!r}")
    self.close()
    self.position = position


def _worker_pipeline(options: PipelineOptions, split_path: str, spec: SourceSpec,
                     inputs: InputBuilder, process_index: int, process_count: int
                     ) -> TrainPipeline:
  """The pipeline a worker process builds batches with (`workers.process_prefetcher`)."""
  return TrainPipeline(options, prepared.PreparedSplit(split_path, spec), inputs,
                       process_index, process_count)


def make_train_iterator(config: ml_collections.ConfigDict, inputs: InputBuilder,
                        process_index: int, process_count: int) -> TrainPipeline:
  """The trainer's `TrainIterator` over `config.train_split` (see `TrainPipeline`),
  its split's bad images already raised or reported (`check_bad_images`)."""
  options = pipeline_options(config, inputs)
  split = config.get("train_split")
  if not isinstance(split, str) or not split:
    raise config_error("train_split", split, "must be a split name")
  pipeline = TrainPipeline(options, open_prepared(options, split), inputs,
                           process_index, process_count)
  pipeline.check_bad_images()
  return pipeline
