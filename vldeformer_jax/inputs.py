"""Tokenization and input layout: strings and region arrays -> padded model inputs.

Three layouts over one BERT (see the notes on Oscar's format):
  text  : [CLS] caption [SEP]                    segment 0, positions 0..L-1
  image : [CLS] tags [SEP] + regions             CLS segment 0, tags and SEP
                                                 `tag_segment_id`, positions from 0
  joint : [CLS] caption [SEP] tags [SEP] + regions   segment 0 up to the first SEP,
                                                 1 for tags and the final SEP
Regions carry no position or segment embedding; padded regions are masked out.

Everything here is NumPy: the outputs feed `jax.jit`ted functions (and tf.data) as plain
arrays, padded to a caller-chosen length so compiled shapes stay few.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers

from vldeformer_jax.config import ModelConfig

CLS, SEP, PAD = "[CLS]", "[SEP]", "[PAD]"
Sequence_ = tuple[list[int], list[int]]  # (token ids, segment ids) of one sequence.
# A training batch by part: each part's model inputs (`Batch.as_dict()`, plus the
# trainer's `pack_index`) for the same rows: a caption, its image, and their hard
# negatives.
PARTS = ("text", "image", "neg_text", "neg_image")
BatchParts = dict[str, dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Batch:
  """Padded model inputs; `regions` is None for text-only batches.

  input_ids, token_type_ids, position_ids, token_mask: int32 [B, L]
  regions: float32 [B, R, img_feature_dim]; region_mask: int32 [B, R]
  """
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  position_ids: np.ndarray
  token_mask: np.ndarray
  regions: np.ndarray | None = None
  region_mask: np.ndarray | None = None

  def as_dict(self) -> dict[str, np.ndarray]:
    """The present arrays by name (no copies: `dataclasses.asdict` would deep-copy)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}

  def __len__(self) -> int:
    return self.input_ids.shape[0]


def bucket(n: int, limit: int, multiple: int = 8) -> int:
  """Smallest power of two >= n (for n <= multiple) or multiple of `multiple`, <= limit."""
  if n <= multiple:
    size = 1 << max(n - 1, 0).bit_length()
  else:
    size = -(-n // multiple) * multiple
  return min(size, max(limit, n))


# Padded axes of a training batch: (part, array) -> which length it pads.
_TEXT_PARTS, _IMAGE_PARTS = ("text", "neg_text"), ("image", "neg_image")


def padded_lengths(batch: dict[str, dict[str, np.ndarray]]) -> dict[str, int]:
  """How many leading columns of each padded axis of a training batch (`text`, `image`
  and their hard negatives) hold real entries: one past the last mask-1 column,
  {'text': .., 'tags': .., 'regions': ..}."""
  def longest(parts, mask):
    ends = [batch[p][mask].any(axis=0).nonzero()[0] for p in parts if p in batch]
    return max((int(e[-1]) + 1 for e in ends if e.size), default=0)
  return {"text": longest(_TEXT_PARTS, "token_mask"),
          "tags": longest(_IMAGE_PARTS, "token_mask"),
          "regions": longest(_IMAGE_PARTS, "region_mask")}


def trim_padding(batch: dict[str, dict[str, np.ndarray]], lengths: dict[str, int],
                 multiple: int) -> dict[str, dict[str, np.ndarray]]:
  """Cuts a training batch's padding down to length buckets: each padded axis keeps
  `bucket(lengths[axis], its current size, multiple)` columns, so a step compiles once
  per bucket and pads little. Only padding is cut (`lengths` are at least the real
  lengths, e.g. `padded_lengths` agreed across processes), so with masked pooling
  every result is unchanged. Views, no copies."""
  out = {}
  for part, arrays in batch.items():
    axis = "text" if part in _TEXT_PARTS else "tags"
    length = bucket(lengths[axis], arrays["input_ids"].shape[1], multiple)
    trimmed = {k: v[:, :length] for k, v in arrays.items() if k not in ("regions",
                                                                        "region_mask")}
    if "regions" in arrays:
      r = bucket(lengths["regions"], arrays["regions"].shape[1], multiple)
      trimmed["regions"] = arrays["regions"][:, :r]
      trimmed["region_mask"] = arrays["region_mask"][:, :r]
    out[part] = trimmed
  return out


def sequence_mask(part: dict[str, np.ndarray]) -> np.ndarray:
  """[B, L (+ R)] the model's sequence mask of a batch part: tokens, then regions."""
  if "region_mask" not in part:
    return part["token_mask"]
  return np.concatenate([part["token_mask"], part["region_mask"]], axis=1)


def pack_index(mask: np.ndarray, groups: int, slots: int) -> np.ndarray:
  """[groups, slots] int32 for the model's token packing (`model.Packing`): for each
  group of B / groups consecutive rows, the flat index (row in group x L + position)
  of each real position of `mask` [B, L], in order, then R * L for the unused slots."""
  b, l = mask.shape
  if b % groups:
    raise ValueError(f"{b} rows do not split into {groups} packing groups")
  flat = np.asarray(mask).reshape(groups, -1) != 0
  out = np.full((groups, slots), flat.shape[1], np.int32)
  for g, row in enumerate(flat):
    real = np.flatnonzero(row)
    if real.size > slots:
      raise ValueError(f"packing group {g} holds {real.size} real positions, more "
                       f"than its {slots} slots")
    out[g, :real.size] = real
  return out


def packed_lengths(batch: dict[str, dict[str, np.ndarray]], groups: int
                   ) -> dict[str, int]:
  """The most real positions (tokens and regions) one group of B / groups rows holds,
  over the parts of each modality: {'text': .., 'image': ..}."""
  def most(parts):
    counts = [sequence_mask(batch[p]).reshape(groups, -1).sum(axis=1).max()
              for p in parts if p in batch]
    return int(max(counts, default=0))
  return {"text": most(_TEXT_PARTS), "image": most(_IMAGE_PARTS)}


def add_pack_index(batch: dict[str, dict[str, np.ndarray]], lengths: dict[str, int],
                   groups: int, multiple: int) -> dict[str, dict[str, np.ndarray]]:
  """Each part with its `pack_index` (see `pack_index`) for `groups` groups of rows
  (one per device), the slots of each modality `bucket(lengths[modality], B/groups *
  L, multiple)`: a step compiles once per bucket. `lengths` are at least the real
  counts (`packed_lengths`, agreed across processes)."""
  out = {}
  for part, arrays in batch.items():
    mask = sequence_mask(arrays)
    n = lengths["text" if part in _TEXT_PARTS else "image"]
    slots = bucket(n, mask.size // groups, multiple)
    out[part] = {**arrays, "pack_index": pack_index(mask, groups, slots)}
  return out


def load_tokenizer(vocab_path: str | Path, lowercase: bool = True
                   ) -> tokenizers.Tokenizer:
  """The checkpoint's WordPiece vocab as a fast tokenizer, without special tokens.

  Built with `tokenizers.BertWordPieceTokenizer(path, lowercase=...)`: the
  `BertTokenizerFast(vocab_file=...)` spelling silently maps everything to [UNK] in
  transformers 5.x. Special tokens are added by the layout functions below.
  """
  vocab_path = Path(vocab_path)
  if not vocab_path.is_file():
    raise FileNotFoundError(f"{vocab_path}: vocabulary file not found")
  tok = tokenizers.BertWordPieceTokenizer(str(vocab_path), lowercase=lowercase)
  for special in (CLS, SEP, PAD):
    if tok.token_to_id(special) is None:
      raise ValueError(f"{vocab_path}: vocabulary has no {special} token")
  tok.no_truncation()
  tok.no_padding()
  return tok


class InputBuilder:
  """Turns captions / tags / regions into `Batch`es for one `ModelConfig`."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, config: ModelConfig):
    self.tokenizer = tokenizer
    self.config = config
    self.cls_id = tokenizer.token_to_id(CLS)
    self.sep_id = tokenizer.token_to_id(SEP)
    self.pad_id = tokenizer.token_to_id(PAD)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """WordPiece ids of each text, no special tokens, no truncation."""
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encs]

  # Single sequences (lists of ids plus segment ids), before padding.
  def text_tokens(self, caption_ids: list[int]) -> Sequence_:
    ids = [self.cls_id] + caption_ids[: self.config.max_text_len - 2] + [self.sep_id]
    return ids, [0] * len(ids)

  def image_tokens(self, tag_ids: list[int]) -> Sequence_:
    seg = self.config.tag_segment_id
    body = tag_ids[: self.config.max_tag_len - 2] + [self.sep_id]
    return [self.cls_id] + body, [0] + [seg] * len(body)

  def joint_tokens(self, caption_ids: list[int], tag_ids: list[int]
                   ) -> Sequence_:
    """Oscar's pair layout; the caption keeps priority when truncating to max_joint_len."""
    limit = self.config.max_joint_len
    a = [self.cls_id] + caption_ids[: limit - 3] + [self.sep_id]
    b = tag_ids[: max(limit - len(a) - 1, 0)] + [self.sep_id]
    return a + b, [0] * len(a) + [1] * len(b)

  def text_sequences(self, captions: Sequence[str]) -> list[Sequence_]:
    return [self.text_tokens(ids) for ids in self.tokenize(captions)]

  def image_sequences(self, tags: Sequence[str]) -> list[Sequence_]:
    return [self.image_tokens(ids) for ids in self.tokenize(tags)]

  def joint_sequences(self, captions: Sequence[str], tags: Sequence[str]
                      ) -> list[Sequence_]:
    _check_aligned(captions=captions, tags=tags)
    return [self.joint_tokens(c, t)
            for c, t in zip(self.tokenize(captions), self.tokenize(tags))]

  def batch(self, seqs: Sequence[Sequence_], regions: Sequence[np.ndarray] | None = None,
            length: int | None = None, num_regions: int | None = None,
            rows: int | None = None) -> Batch:
    """Pads token sequences (and regions, when given) into one `Batch`.

    length: padded token length (default: the longest); num_regions: padded region
    count (default: config.max_regions; longer region lists keep their first ones, as
    Oscar does); rows: padded batch size (default: len(seqs)); padded rows are all-mask-0.
    """
    tokens = self._pad_tokens(seqs, length, rows)
    if regions is None:
      return Batch(*tokens)
    _check_aligned(sequences=seqs, regions=regions)
    return Batch(*tokens, *self._pad_regions(regions, num_regions, rows))

  def _pad_tokens(self, seqs: Sequence[Sequence_], length: int | None,
                  rows: int | None):
    n = len(seqs)
    longest = max((len(s[0]) for s in seqs), default=1)
    length = length or longest
    if longest > length:
      raise ValueError(f"sequence of {longest} tokens exceeds padded length {length}")
    rows = rows or n
    if rows < n:
      raise ValueError(f"{n} examples exceed {rows} rows")
    ids = np.full((rows, length), self.pad_id, np.int32)
    types = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, (tok, seg) in enumerate(seqs):
      ids[i, : len(tok)] = tok
      types[i, : len(seg)] = seg
      mask[i, : len(tok)] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
    return ids, types, np.ascontiguousarray(positions), mask

  def _pad_regions(self, regions: Sequence[np.ndarray], num_regions: int | None,
                   rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    dim = self.config.img_feature_dim
    rows = rows or len(regions)
    num_regions = num_regions or self.config.max_regions
    out = np.zeros((rows, num_regions, dim), np.float32)
    mask = np.zeros((rows, num_regions), np.int32)
    for i, r in enumerate(regions):
      r = np.asarray(r)
      if r.ndim != 2 or r.shape[1] != dim:
        raise ValueError(
            f"regions[{i}] has shape {r.shape}, expected [num_regions, {dim}]")
      if not np.all(np.isfinite(r)):
        raise ValueError(f"regions[{i}] contains NaN or Inf")
      k = min(len(r), num_regions)
      out[i, :k] = r[:k]
      mask[i, :k] = 1
    return out, mask


def _check_aligned(**lists: Sequence) -> None:
  lengths = {k: len(v) for k, v in lists.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"inputs must have the same length, got {lengths}")
