"""Flax modules: Oscar/VinVL's `BertImgModel` and the VLDeformer heads on top of it.

One parameter set, three uses (see `VLBert`):
  * `encode`: one text or one image (tags + regions) alone -> pooled embedding r_t / r_v;
  * `match_logits`: the early-interaction pair `[CLS] caption [SEP] tags [SEP]` + regions
    -> pooler -> classifier: the VinVL cross-encoder baseline and our re-ranker.

Module and parameter names mirror the PyTorch state dict, so conversion is a mechanical
renaming (see `convert.py`). The encoder layers run under `nn.scan`: one traced layer
instead of N (compile time does not grow with depth), parameters stacked on a leading
layer axis: `bert/encoder/layer/...[N, ...]` <-> `bert.encoder.layer.N....`. Numerics
follow Oscar: post-LN layers, exact erf GELU, additive attention mask `(1 - m) * -10000`,
LayerNorm eps from the config, region embeddings with no position or token-type embedding.

Attention (`ModelConfig.attention_impl`): 'xla' materialises the float32 [B, H, L, L]
scores and applies dropout to the probabilities, as BERT does; 'cudnn' is cuDNN's fused
flash attention through `jax.nn.dot_product_attention` (bf16 only, no probability
dropout); 'auto' takes cuDNN on a GPU whenever it computes the same function (bf16, no
attention-probability dropout active), XLA otherwise. cuDNN takes padding as per-row key
counts, so on that path each row's real positions are first moved to the front: a
permutation that changes no result (attention is order-free over keys, position
embeddings are already added, and every pooling reads position 0, a masked mean or a
full mean).

Token packing (`pack_index`, training): every layer's dense parts (projections, FFN,
LayerNorms) are position-wise, so they run on each device's real tokens and regions
packed into `T` slots ([G, T, H], G groups of rows) instead of the padded [B, L, H];
only attention sees rows, gathered per layer into the real-first layout (`Packing`).
Dropout masks are drawn for the padded layout, as without packing, and moved to the
slots: a packed model computes the same function with the same random stream, on about
the real tokens' share of the work.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vldeformer_jax.config import ModelConfig

Array = jax.Array
MASK_VALUE = -10000.0  # Oscar/BERT's additive mask for padded keys.
_INIT = nn.initializers.normal(0.02)  # BERT's initializer_range.


def Dense(features: int, dtype, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_INIT, name=name)


def _activation(name: str):
  if name in ("gelu", "gelu_python"):
    return lambda x: jax.nn.gelu(x, approximate=False)  # exact erf GELU, as BERT.
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


def compute_dtype(config: ModelConfig):
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


class Embeddings(nn.Module):
  """Token embeddings (word + position + type, LayerNorm) and region embeddings."""
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array,
               deterministic: bool) -> Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=dtype,
                                     embedding_init=_INIT, name=name)
    x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
         + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="LayerNorm")(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


def use_fused_attention(config: ModelConfig, deterministic: bool) -> bool:
  """Whether the layers run cuDNN's fused attention (see the module docstring)."""
  dropout_active = config.attention_probs_dropout_prob > 0 and not deterministic
  if config.attention_impl == "xla":
    return False
  if config.attention_impl == "cudnn":
    if dropout_active:
      raise ValueError(
          "attention_impl='cudnn' has no attention-probability dropout: set "
          "attention_probs_dropout_prob=0 (the trainer's --config.attention_dropout=0) "
          "or attention_impl='xla'")
    if config.dtype != "bfloat16":
      raise ValueError("attention_impl='cudnn' needs dtype='bfloat16'")
    return True
  return (not dropout_active and config.dtype == "bfloat16"
          and jax.default_backend() == "gpu")


class SelfAttention(nn.Module):
  """Multi-head self-attention. `mask` is [B, L] (1 = real); `kv_lengths` [B] int32 is
  given on the fused path, where each row's real keys come first. With `packing`, `x`
  is packed [G, T, H] and `mask` the real-first one: queries, keys and values move to
  the real-first rows for attention and the result back to the slots."""
  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, kv_lengths: Array | None,
               packing: Packing | None = None) -> Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    b, l = mask.shape
    rows = (lambda t: t) if packing is None else packing.to_rows
    split = lambda t: rows(t).reshape(b, l, cfg.num_attention_heads, cfg.head_dim)
    q = split(Dense(cfg.hidden_size, dtype, name="query")(x))
    k = split(Dense(cfg.hidden_size, dtype, name="key")(x))
    v = split(Dense(cfg.hidden_size, dtype, name="value")(x))
    if kv_lengths is not None:
      out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths,
                                         implementation="cudnn")
    else:
      mask_bias = ((1.0 - mask.astype(jnp.float32)) * MASK_VALUE)[:, None, None, :]
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
      scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim)) + mask_bias  # [B,H,L,L]
      probs = jax.nn.softmax(scores, axis=-1)
      rate = cfg.attention_probs_dropout_prob
      if packing is not None and rate > 0 and not self.deterministic:
        probs = packing.attention_dropout(probs, rate)
      else:
        probs = nn.Dropout(rate)(probs, deterministic=self.deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v)
    out = out.reshape(b, l, cfg.hidden_size)
    return out if packing is None else packing.to_slots(out)


class DenseLayerNorm(nn.Module):
  """BERT's `*Output` block: dense, dropout, residual add, LayerNorm (post-LN)."""
  config: ModelConfig
  features: int
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, residual: Array, packing: Packing | None = None) -> Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    x = Dense(self.features, dtype, name="dense")(x)
    x = dropout(x, cfg.hidden_dropout_prob, self.deterministic, packing)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="LayerNorm")(
        x + residual)


class Attention(nn.Module):
  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, kv_lengths: Array | None,
               packing: Packing | None) -> Array:
    h = SelfAttention(self.config, self.deterministic, name="self")(x, mask, kv_lengths,
                                                                     packing)
    return DenseLayerNorm(self.config, self.config.hidden_size, self.deterministic,
                          name="output")(h, x, packing)


class Intermediate(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x = Dense(cfg.intermediate_size, compute_dtype(cfg), name="dense")(x)
    return _activation(cfg.hidden_act)(x)


class Layer(nn.Module):
  """One post-LN transformer layer in `nn.scan`'s (carry, *broadcast) -> (carry, out)
  form: the hidden states are the carry; the mask, key counts and packing are
  broadcast."""
  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, kv_lengths: Array | None,
               packing: Packing | None) -> tuple[Array, None]:
    x = Attention(self.config, self.deterministic, name="attention")(x, mask, kv_lengths,
                                                                      packing)
    h = Intermediate(self.config, name="intermediate")(x)
    x = DenseLayerNorm(self.config, self.config.hidden_size, self.deterministic,
                       name="output")(h, x, packing)
    return x, None


class Encoder(nn.Module):
  """The N layers as one `nn.scan` (parameters stacked on axis 0, a dropout key per
  layer); with `remat`, each layer's activations are recomputed in the backward pass.
  `scan_unroll` layers are traced per loop iteration: N compiles the N layers as
  straight-line code (slower to compile; on a CPU about 10% faster to run).

  `scan_layers=False`: N layers with their own parameters (`layer_0` ...; see
  `unstack_layers`). Inference always runs this way: a scanned layer reads its weights
  as a slice of the stacked arrays, which XLA copies out on every call (the whole
  encoder's weights: most of a single caption's time on a CPU), while separate arrays
  are read in place. Training may (`--config.scan_layers=False`: no loop and no stacked
  activations, slower to compile), over slices of its stacked state. Models are
  stored and converted stacked."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, kv_lengths: Array | None,
               packing: Packing | None, deterministic: bool) -> Array:
    layer_cls = nn.remat(Layer, prevent_cse=False) if self.config.remat else Layer
    if not self.config.scan_layers:
      for i in range(self.config.num_hidden_layers):
        x, _ = layer_cls(self.config, deterministic, name=f"layer_{i}")(
            x, mask, kv_lengths, packing)
      return x
    scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 3,
                      length=self.config.num_hidden_layers,
                      unroll=min(self.config.scan_unroll, self.config.num_hidden_layers))
    x, _ = scanned(self.config, deterministic, name="layer")(x, mask, kv_lengths, packing)
    return x


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Stacked parameters (`bert/encoder/layer/...` [N, ...]) -> one tree per layer
  (`bert/encoder/layer_i/...`), the layout of `scan_layers=False`; the other entries
  are shared, not copied. (`model_dir.stack_per_layer_keys` is the inverse.)"""
  encoder = dict(params["bert"]["encoder"])
  stacked = encoder.pop("layer")
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    encoder[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, "bert": {**params["bert"], "encoder": encoder}}


def real_first(mask: Array) -> tuple[Array, Array]:
  """(order [B, L], count [B]): per row, the indices of its real positions (mask 1) in
  their order, then those of its padding; and the number of real positions."""
  order = jnp.argsort(mask == 0, axis=1, stable=True).astype(jnp.int32)
  return order, mask.astype(jnp.int32).sum(axis=1)


@jax.custom_vjp
def gather_rows(x: Array, index: Array, inverse: Array) -> Array:
  """x [G, N, ...] -> [G, M, ...]: row index[g, m] of group g (N: a row of zeros).

  `index` must pick each of x's rows at most once and `inverse` [G, N] must be its
  inverse (the m that picks row n, or M where none does): then the gradient is the
  gather by `inverse`, not a scatter-add (slow on a CPU)."""
  return _take_rows(x, index)


def _take_rows(x: Array, index: Array) -> Array:
  zero_row = jnp.zeros((x.shape[0], 1) + x.shape[2:], x.dtype)
  x = jnp.concatenate([x, zero_row], axis=1)
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _gather_rows_fwd(x, index, inverse):
  return _take_rows(x, index), inverse


def _gather_rows_bwd(inverse, g):
  return _take_rows(g, inverse), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def permute_rows(x: Array, order: Array) -> Array:
  """x[b, order[b, i]] for per-row permutations `order` [B, L]."""
  return gather_rows(x, order, jnp.argsort(order, axis=1).astype(jnp.int32))


class Packing(NamedTuple):
  """Where each real token of a batch sits in three layouts: padded (rows of L, as
  given), real-first (each row's real positions first, in order: what attention sees)
  and packed (each group of R = B / G consecutive rows' real positions in T slots, row
  after row). Flat indices count within a group (row in group x L + position); index
  R * L (or T) is "none". Built by `Packing.build`; a pytree of int arrays."""
  mask: Array          # [B, L] real-first mask: position < lengths
  lengths: Array       # [B] real positions per row
  order: Array         # [B, L] padded position of each real-first position
  slot_origins: Array  # [G, T] padded flat index of each slot's token
  origin_slots: Array  # [G, R*L] slot of each padded position
  slot_rows: Array     # [G, T] real-first flat index of each slot's token
  row_slots: Array     # [G, R*L] slot of each real-first position

  @staticmethod
  def build(mask: Array, pack_index: Array) -> "Packing":
    """From the padded mask [B, L] and `pack_index` [G, T] (`inputs.pack_index`: the
    padded flat index of each group's real positions in order, then R * L)."""
    (b, l), (g, t) = mask.shape, pack_index.shape
    none = b // g * l                                          # R * L: no position
    m = mask.reshape(g, b // g, l).astype(jnp.int32)
    lengths = m.sum(axis=-1)                                   # [G, R]
    offsets = jnp.cumsum(lengths, axis=1) - lengths            # first slot of each row
    rank = jnp.cumsum(m, axis=-1) - 1                          # [G, R, L]
    pos = jnp.arange(l)
    first = pos < lengths[..., None]                           # real-first mask [G, R, L]
    origin_slots = jnp.where(m > 0, offsets[..., None] + rank, t).reshape(g, -1)
    row_slots = jnp.where(first, offsets[..., None] + pos, t).reshape(g, -1)
    used = jnp.arange(t)[None, :] < lengths.sum(axis=1, keepdims=True)      # [G, T]
    origin = jnp.minimum(pack_index, none - 1)
    slot_origins = jnp.where(used, origin, none)
    # A slot's real-first index: its row's start, plus its rank among the row's reals.
    slot_rank = jnp.take_along_axis(rank.reshape(g, -1), origin, axis=1)
    slot_rows = jnp.where(used, origin // l * l + slot_rank, none)
    return Packing(first.reshape(b, l), lengths.reshape(b), real_first(mask)[0],
                   *(x.astype(jnp.int32) for x in (slot_origins, origin_slots, slot_rows,
                                                   row_slots)))

  def _grouped(self, x: Array) -> Array:
    return x.reshape((self.slot_origins.shape[0], -1) + x.shape[2:])

  def pack(self, x: Array) -> Array:
    """Padded [B, L, ...] -> packed [G, T, ...]."""
    return gather_rows(self._grouped(x), self.slot_origins, self.origin_slots)

  def to_rows(self, x: Array) -> Array:
    """Packed [G, T, ...] -> real-first [B, L, ...] (zeros after each row's length)."""
    return gather_rows(x, self.row_slots, self.slot_rows).reshape(
        self.mask.shape + x.shape[2:])

  def to_slots(self, x: Array) -> Array:
    """Real-first [B, L, ...] -> packed [G, T, ...]."""
    return gather_rows(self._grouped(x), self.slot_rows, self.row_slots)

  def dropout(self, x: Array, rate: float) -> Array:
    """Dropout of packed `x` [G, T, F] with the padded [B, L, F] layout's mask."""
    return _moved_dropout(x, rate, self.mask.shape + x.shape[2:],
                          lambda keep: _take_rows(self._grouped(keep), self.slot_origins))

  def attention_dropout(self, probs: Array, rate: float) -> Array:
    """Dropout of real-first attention probabilities [B, heads, L, L] with the padded
    layout's mask."""
    def move(keep):
      keep = jnp.take_along_axis(keep, self.order[:, None, :, None], axis=2)
      return jnp.take_along_axis(keep, self.order[:, None, None, :], axis=3)
    return _moved_dropout(probs, rate, probs.shape, move)


def _moved_dropout(x: Array, rate: float, padded_shape: tuple[int, ...], move) -> Array:
  """nn.Dropout of `x`, which holds a padded [padded_shape] array's values in another
  layout: the keep mask is the one nn.Dropout draws for the padded array (same module
  path, same key, same shape: packing changes no random stream), then `move`d to x's
  layout."""
  keep = nn.Dropout(rate)(jnp.ones(padded_shape, jnp.float32), deterministic=False) > 0
  return jax.lax.select(move(keep), x / (1.0 - rate), jnp.zeros_like(x))


def dropout(x: Array, rate: float, deterministic: bool, packing: Packing | None) -> Array:
  """nn.Dropout, on the padded or (with `packing`) the packed layout."""
  if packing is None or deterministic or rate == 0.0:
    return nn.Dropout(rate)(x, deterministic=deterministic)
  return packing.dropout(x, rate)


class Pooler(nn.Module):
  """BERT's pooler: dense + tanh on the first token ([CLS])."""
  config: ModelConfig

  @nn.compact
  def __call__(self, seq: Array) -> Array:
    cfg = self.config
    return jnp.tanh(Dense(cfg.hidden_size, compute_dtype(cfg), name="dense")(seq[:, 0]))


class BertImgModel(nn.Module):
  """Oscar's BERT: tokens then (optionally) regions in one sequence.

  Args of `__call__` (all padded, with masks; shapes in comments):
    input_ids, token_type_ids, position_ids, token_mask: [B, L] int32 (mask 1 = real).
    regions: [B, R, img_feature_dim] float or None; region_mask: [B, R] or None.
    pack_index: [G, T] int32 or None: run the layers on packed tokens (`Packing`;
      from `inputs.pack_index` over the mask of tokens then regions).
  Returns (sequence_output [B, L+R, H], sequence_mask [B, L+R], pooled_output [B, H]).
  On the fused-attention path and with packing the sequence comes with each row's real
  positions first ([CLS], always real, stays at 0), and the mask returned is in the
  same order.
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg)
    self.embeddings = Embeddings(cfg)
    self.img_embedding = Dense(cfg.hidden_size, dtype)
    if cfg.use_img_layernorm:
      # Oscar names the image LayerNorm `bert.LayerNorm`.
      self.LayerNorm = nn.LayerNorm(epsilon=cfg.img_layer_norm_eps, dtype=dtype)
    self.img_dropout = nn.Dropout(cfg.hidden_dropout_prob)
    self.encoder = Encoder(cfg)
    self.pooler = Pooler(cfg)

  def embed_regions(self, regions: Array, deterministic: bool) -> Array:
    x = self.img_embedding(regions.astype(compute_dtype(self.config)))
    if self.config.use_img_layernorm:
      x = self.LayerNorm(x)
    return self.img_dropout(x, deterministic=deterministic)

  def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array,
               token_mask: Array, regions: Array | None = None,
               region_mask: Array | None = None,
               deterministic: bool = True,
               pack_index: Array | None = None) -> tuple[Array, Array, Array]:
    x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic)
    mask = token_mask
    if regions is not None:
      if region_mask is None:
        region_mask = jnp.ones(regions.shape[:2], token_mask.dtype)
      x = jnp.concatenate([x, self.embed_regions(regions, deterministic)], axis=1)
      mask = jnp.concatenate([token_mask, region_mask.astype(token_mask.dtype)], axis=1)
    fused = use_fused_attention(self.config, deterministic)
    kv_lengths, packing = None, None
    if pack_index is not None:
      if self.config.pooling == "mean_unmasked":
        raise ValueError("pooling='mean_unmasked' averages the padding too, which "
                         "packing does not compute: pack only with masked pooling")
      packing = Packing.build(mask, pack_index)
      x, mask = packing.pack(x), packing.mask
      kv_lengths = packing.lengths if fused else None
    elif fused:
      order, kv_lengths = real_first(mask)
      x = permute_rows(x, order)
      mask = jnp.take_along_axis(mask, order, axis=1)
    seq = self.encoder(x, mask, kv_lengths, packing, deterministic)
    if packing is not None:
      seq = packing.to_rows(seq)
    pooled = self.pooler(seq)
    return seq, mask, pooled


def pool(seq: Array, mask: Array, pooled: Array, pooling: str) -> Array:
  """The VLDeformer representation r = tanh(pool(hidden states)), float32 [B, H].

  'mean': masked mean over real tokens and regions (the paper's average pooling);
  'mean_unmasked': mean over every position, padding included (the authors' code; the
    caller pads to fixed lengths so the result does not depend on the batch);
  'cls': BERT's pooler output (dense + tanh on [CLS]), the "w/o avg pool" ablation.
  """
  seq = seq.astype(jnp.float32)
  if pooling == "cls":
    return pooled.astype(jnp.float32)
  if pooling == "mean_unmasked":
    return jnp.tanh(seq.mean(axis=1))
  m = mask.astype(jnp.float32)[..., None]
  return jnp.tanh((seq * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0))


class VLBert(nn.Module):
  """The whole model: `bert` (BertImgModel) + `classifier` (Linear(H -> num_labels))."""
  config: ModelConfig

  def setup(self):
    self.bert = BertImgModel(self.config)
    self.classifier = Dense(self.config.num_labels, compute_dtype(self.config))
    self.classifier_dropout = nn.Dropout(self.config.hidden_dropout_prob)

  def encode(self, input_ids: Array, token_type_ids: Array, position_ids: Array,
             token_mask: Array, regions: Array | None = None,
             region_mask: Array | None = None, deterministic: bool = True,
             pack_index: Array | None = None) -> Array:
    """Individual (decomposed) encoding of one text or one image -> r [B, H] float32
    (`pack_index`: see `BertImgModel`)."""
    seq, mask, pooled = self.bert(input_ids, token_type_ids, position_ids, token_mask,
                                  regions, region_mask, deterministic, pack_index)
    return pool(seq, mask, pooled, self.config.pooling)

  def match_logits(self, input_ids: Array, token_type_ids: Array, position_ids: Array,
                   token_mask: Array, regions: Array, region_mask: Array,
                   deterministic: bool = True) -> Array:
    """Joint (early-interaction) scoring: classifier logits [B, num_labels] float32."""
    _, _, pooled = self.bert(input_ids, token_type_ids, position_ids, token_mask,
                             regions, region_mask, deterministic)
    pooled = self.classifier_dropout(pooled, deterministic=deterministic)
    return self.classifier(pooled).astype(jnp.float32)

  def __call__(self, input_ids, token_type_ids, position_ids, token_mask, regions,
               region_mask):
    """Used only by `init_params`: runs every submodule once."""
    return self.match_logits(input_ids, token_type_ids, position_ids, token_mask,
                             regions, region_mask)


def init_params(config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Fresh float32 parameters for `VLBert(config)`, BERT's initialisation (N(0, 0.02)
  weights, zero biases, unit LayerNorm): the "w/o pre-train" ablation and the heads a
  text-only checkpoint lacks. Always the stacked layout (the stored one)."""
  ids = jnp.zeros((1, 3), jnp.int32)
  regions = jnp.zeros((1, 1, config.img_feature_dim), jnp.float32)
  return VLBert(config.replace(scan_layers=True)).init(
      rng, ids, ids, ids, jnp.ones_like(ids), regions, jnp.ones((1, 1), jnp.int32))["params"]


def param_shapes(config: ModelConfig) -> dict[str, Any]:
  """The parameter tree's shapes (jax.ShapeDtypeStruct leaves), without allocating."""
  return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
