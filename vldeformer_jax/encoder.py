"""The user-facing model: strings and region arrays in, NumPy embeddings and scores out.

    import vldeformer_jax as vld
    model = vld.load_pretrained(model_dir)
    r_t = model.encode_text(captions)                # [n, hidden] float32
    r_v = model.encode_image(tags, regions)          # [n, hidden] float32
    s = model.score_pairs(captions, tags, regions)   # [n] joint match logits

Inputs are split into chunks of at most `batch_size` rows; rows and sequence lengths are
padded to a few bucket sizes so that only a handful of shapes are ever compiled, and the
padding is masked so results do not depend on how inputs are batched.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vldeformer_jax.config import ModelConfig
from vldeformer_jax.inputs import Batch, InputBuilder, load_tokenizer
from vldeformer_jax.model import VLBert
from vldeformer_jax.model_dir import load_model_dir


def bucket(n: int, limit: int, multiple: int = 8) -> int:
  """Smallest power of two >= n (for n <= multiple) or multiple of `multiple`, <= limit."""
  if n <= multiple:
    size = 1 << max(n - 1, 0).bit_length()
  else:
    size = -(-n // multiple) * multiple
  return min(size, max(limit, n))


@functools.lru_cache(maxsize=16)
def compiled_functions(config: ModelConfig) -> tuple[Callable, Callable]:
  """Jitted (encode, match_logits) for a config, shared by every `VLDeformer` with that
  config, so a trainer that evaluates with fresh parameters never recompiles."""
  module = VLBert(config)
  return (jax.jit(functools.partial(module.apply, method=VLBert.encode)),
          jax.jit(functools.partial(module.apply, method=VLBert.match_logits)))


class VLDeformer:
  """A converted or trained model with its tokenizer; see the module docstring."""

  def __init__(self, config: ModelConfig, params: Any, vocab_file: str | Path,
               batch_size: int = 64):
    self.config = config
    self.params = jax.device_put(params)
    self.vocab_file = Path(vocab_file)
    self.inputs = InputBuilder(load_tokenizer(vocab_file, config.do_lower_case), config)
    self.batch_size = batch_size
    self._encode, self._match = compiled_functions(config)

  def _run(self, fn: Callable, make_batch: Callable[[slice, int], Batch], n: int,
           out_fn: Callable[[jax.Array], jax.Array]) -> np.ndarray:
    outs = []
    for start in range(0, n, self.batch_size):
      chunk = slice(start, min(start + self.batch_size, n))
      rows = bucket(chunk.stop - chunk.start, self.batch_size)
      batch = make_batch(chunk, rows)
      out = out_fn(fn({"params": self.params}, **batch.as_dict()))
      outs.append(np.asarray(out)[: chunk.stop - chunk.start])
    if not outs:
      return np.zeros((0,), np.float32)
    return np.concatenate(outs).astype(np.float32)

  def encode_text(self, captions: Sequence[str]) -> np.ndarray:
    """r_t for each caption: [n, hidden] float32 (pooled + tanh, not L2-normalised)."""
    captions = _as_list(captions, "captions")
    seqs = self.inputs.text_sequences(captions)
    make = self._batch_maker(seqs, None, self.config.max_text_len)
    out = self._run(self._encode, make, len(captions), lambda x: x)
    return out.reshape(len(captions), self.config.hidden_size)

  def encode_image(self, tags: Sequence[str], regions: Sequence[np.ndarray]
                   ) -> np.ndarray:
    """r_v for each image (tag string + region features [n_i, img_feature_dim])."""
    tags = _as_list(tags, "tags")
    regions = _as_list(regions, "regions")
    if len(tags) != len(regions):
      raise ValueError(f"{len(tags)} tag strings but {len(regions)} region arrays")
    seqs = self.inputs.image_sequences(tags)
    make = self._batch_maker(seqs, regions, self.config.max_tag_len)
    out = self._run(self._encode, make, len(tags), lambda x: x)
    return out.reshape(len(tags), self.config.hidden_size)

  def score_pairs(self, captions: Sequence[str], tags: Sequence[str],
                  regions: Sequence[np.ndarray]) -> np.ndarray:
    """Joint (cross-encoder) match logit of each aligned (caption, image) triple: [n].

    With Oscar's 2-way classifier this is log p(match) - log p(no match); it ranks
    exactly like Oscar's score softmax(logits)[:, 1].
    """
    captions = _as_list(captions, "captions")
    tags = _as_list(tags, "tags")
    regions = _as_list(regions, "regions")
    if not len(captions) == len(tags) == len(regions):
      raise ValueError(f"score_pairs needs aligned inputs, got {len(captions)} captions, "
                       f"{len(tags)} tag strings, {len(regions)} region arrays")
    seqs = self.inputs.joint_sequences(captions, tags)
    make = self._batch_maker(seqs, regions, self.config.max_text_len)
    return self._run(self._match, make, len(captions), match_logit)

  def _batch_maker(self, seqs, regions: list[np.ndarray] | None, limit: int
                    ) -> Callable[[slice, int], Batch]:
    """Pads one chunk: tokens to a bucket below `limit`, regions to a bucket below
    max_regions (fixed maxima for the unmasked mean, which averages padding too)."""
    cfg = self.config
    fixed = cfg.pooling == "mean_unmasked"

    def make(chunk: slice, rows: int) -> Batch:
      part = seqs[chunk]
      length = limit if fixed else bucket(max(len(s[0]) for s in part), limit)
      if regions is None:
        return self.inputs.batch(part, length=length, rows=rows)
      longest = max(min(len(r), cfg.max_regions) for r in regions[chunk])
      num_regions = cfg.max_regions if fixed else bucket(max(longest, 1), cfg.max_regions)
      return self.inputs.batch(part, regions[chunk], length, num_regions, rows)
    return make


def match_logit(logits: jax.Array) -> jax.Array:
  """Binary log-odds of the match class from classifier logits [B, num_labels]."""
  if logits.shape[-1] == 1:
    return logits[:, 0]
  others = jnp.concatenate([logits[:, :1], logits[:, 2:]], axis=-1)
  return logits[:, 1] - jax.nn.logsumexp(others, axis=-1)


def _as_list(x: Sequence, name: str) -> list:
  if isinstance(x, (str, bytes)):
    raise TypeError(f"{name} must be a sequence, not a single {type(x).__name__}")
  return list(x)


def load_pretrained(model_dir: str | Path, batch_size: int = 64,
                    **config_overrides: Any) -> VLDeformer:
  """Opens a `bin/convert` or `bin/train` model directory.

  `config_overrides` change runtime options only, e.g. `dtype="bfloat16"`,
  `pooling="cls"`, `remat=True`.
  """
  config, params, vocab = load_model_dir(model_dir, **config_overrides)
  return VLDeformer(config, params, vocab, batch_size=batch_size)
