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

from jax.sharding import Mesh

from vldeformer_jax import sharding
from vldeformer_jax.config import ModelConfig
from vldeformer_jax.inputs import Batch, InputBuilder, bucket, load_tokenizer
from vldeformer_jax.model import VLBert, unstack_layers
from vldeformer_jax.model_dir import load_model_dir


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
               batch_size: int = 64, mesh: Mesh | None = None):
    """`mesh`: shard each batch over these devices (rows padded to a multiple of the
    device count); None runs on the default device."""
    self.config = config
    self.mesh = mesh
    # Inference reads each layer's weights from arrays of their own (no per-call
    # copies out of the stacked ones; `Encoder` in model.py): `params` holds that
    # layout, and the compiled functions are built for it.
    self.params = jax.device_put(
        unstack_layers(params), None if mesh is None else sharding.replicated(mesh))
    self.vocab_file = Path(vocab_file)
    self.inputs = InputBuilder(load_tokenizer(vocab_file, config.do_lower_case), config)
    self.batch_size = batch_size
    self._encode, self._match = compiled_functions(config.replace(scan_layers=False))

  def _rows(self, n: int) -> int:
    rows = bucket(n, self.batch_size)
    if self.mesh is not None:
      rows = -(-rows // self.mesh.size) * self.mesh.size
    return rows

  def _place(self, batch: Batch) -> dict[str, Any]:
    arrays = batch.as_dict()
    if self.mesh is None:
      return arrays
    return jax.device_put(arrays, sharding.batch_sharding(self.mesh))

  def _padded(self, longest: int, limit: int) -> int:
    """Padded size of a batch axis (tokens or regions): a bucket of its longest entry,
    or `limit` for the unmasked mean (which averages padding too)."""
    if self.config.pooling == "mean_unmasked":
      return limit
    return bucket(longest, limit)

  def _run(self, fn: Callable, seqs: list, regions: list[np.ndarray] | None,
           limit: int, out_fn: Callable[[jax.Array], jax.Array]) -> np.ndarray:
    """Runs `fn` over length-sorted chunks and returns outputs in input order.

    Sorting by length first keeps padding small (chunks of similar length); tokens are
    padded to a bucket below `limit`, regions to a bucket below max_regions (fixed
    maxima for the unmasked mean, which averages padding too).
    """
    cfg = self.config
    n = len(seqs)
    if n == 0:
      return np.zeros((0,), np.float32)
    n_regions = [0] * n if regions is None else [min(len(r), cfg.max_regions)
                                                 for r in regions]
    order = np.argsort([len(s[0]) + r for s, r in zip(seqs, n_regions)], kind="stable")
    outs = np.empty(n, dtype=object)
    for start in range(0, n, self.batch_size):
      idx = order[start:start + self.batch_size]
      part = [seqs[i] for i in idx]
      length = self._padded(max(len(s[0]) for s in part), limit)
      rows = self._rows(len(idx))
      if regions is None:
        batch = self.inputs.batch(part, length=length, rows=rows)
      else:
        longest = max(max(n_regions[i] for i in idx), 1)
        num = self._padded(longest, cfg.max_regions)
        batch = self.inputs.batch(part, [regions[i] for i in idx], length, num, rows)
      out = np.asarray(out_fn(fn({"params": self.params}, **self._place(batch))))
      for row, i in enumerate(idx):
        outs[i] = out[row]
    return np.stack(list(outs)).astype(np.float32)

  def encode_text(self, captions: Sequence[str]) -> np.ndarray:
    """r_t for each caption: [n, hidden] float32 (pooled + tanh, not L2-normalised)."""
    captions = _as_list(captions, "captions")
    seqs = self.inputs.text_sequences(captions)
    out = self._run(self._encode, seqs, None, self.config.max_text_len, lambda x: x)
    return out.reshape(len(captions), self.config.hidden_size)

  @property
  def encode_fn(self) -> Callable:
    """The jitted `VLBert.encode` ({"params": self.params}, **batch) -> r [B, H], for
    callers that compose it into a program of their own
    (`retrieval.ExactIndex.search_texts`)."""
    return self._encode

  def text_batch(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """The padded inputs `encode_text` would give the encoder for these captions as
    one batch (at most `batch_size`), as host arrays; padding rows have no tokens."""
    captions = _as_list(captions, "captions")
    if not 1 <= len(captions) <= self.batch_size:
      raise ValueError(f"text_batch takes 1 to {self.batch_size} captions (the batch "
                       f"size), got {len(captions)}")
    seqs = self.inputs.text_sequences(captions)
    length = self._padded(max(len(s[0]) for s in seqs), self.config.max_text_len)
    return self.inputs.batch(seqs, length=length,
                             rows=self._rows(len(seqs))).as_dict()

  def encode_image(self, tags: Sequence[str], regions: Sequence[np.ndarray]
                   ) -> np.ndarray:
    """r_v for each image (tag string + region features [n_i, img_feature_dim])."""
    tags = _as_list(tags, "tags")
    regions = _as_list(regions, "regions")
    if len(tags) != len(regions):
      raise ValueError(f"{len(tags)} tag strings but {len(regions)} region arrays")
    seqs = self.inputs.image_sequences(tags)
    out = self._run(self._encode, seqs, regions, self.config.max_tag_len, lambda x: x)
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
    return self._run(self._match, seqs, regions, self.config.max_joint_len, match_logit)


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
                    mesh: Mesh | None = None, **config_overrides: Any) -> VLDeformer:
  """Opens a `bin/convert` or `bin/train` model directory.

  `config_overrides` change runtime options only, e.g. `dtype="bfloat16"`,
  `pooling="cls"`, `remat=True`.
  """
  config, params, vocab = load_model_dir(model_dir, **config_overrides)
  return VLDeformer(config, params, vocab, batch_size=batch_size, mesh=mesh)
