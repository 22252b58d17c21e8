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
"""

from __future__ import annotations

from typing import Any

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
  given on the fused path, where each row's real keys come first."""
  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, kv_lengths: Array | None) -> Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, cfg.num_attention_heads, cfg.head_dim)
    q = split(Dense(cfg.hidden_size, dtype, name="query")(x))
    k = split(Dense(cfg.hidden_size, dtype, name="key")(x))
    v = split(Dense(cfg.hidden_size, dtype, name="value")(x))
    if kv_lengths is not None:
      out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths,
                                         implementation="cudnn")
      return out.reshape(b, l, cfg.hidden_size)
    mask_bias = ((1.0 - mask.astype(jnp.float32)) * MASK_VALUE)[:, None, None, :]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim)) + mask_bias  # [B,H,L,L]
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(
        probs, deterministic=self.deterministic).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, cfg.hidden_size)


class DenseLayerNorm(nn.Module):
  """BERT's `*Output` block: dense, dropout, residual add, LayerNorm (post-LN)."""
  config: ModelConfig
  features: int
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, residual: Array) -> Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    x = Dense(self.features, dtype, name="dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="LayerNorm")(
        x + residual)


class Attention(nn.Module):
  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, kv_lengths: Array | None) -> Array:
    h = SelfAttention(self.config, self.deterministic, name="self")(x, mask, kv_lengths)
    return DenseLayerNorm(self.config, self.config.hidden_size, self.deterministic,
                          name="output")(h, x)


class Intermediate(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x = Dense(cfg.intermediate_size, compute_dtype(cfg), name="dense")(x)
    return _activation(cfg.hidden_act)(x)


class Layer(nn.Module):
  """One post-LN transformer layer in `nn.scan`'s (carry, *broadcast) -> (carry, out)
  form: the hidden states are the carry; the mask and key counts are broadcast."""
  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, mask: Array, kv_lengths: Array | None
               ) -> tuple[Array, None]:
    x = Attention(self.config, self.deterministic, name="attention")(x, mask, kv_lengths)
    h = Intermediate(self.config, name="intermediate")(x)
    x = DenseLayerNorm(self.config, self.config.hidden_size, self.deterministic,
                       name="output")(h, x)
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
               deterministic: bool) -> Array:
    layer_cls = nn.remat(Layer, prevent_cse=False) if self.config.remat else Layer
    if not self.config.scan_layers:
      for i in range(self.config.num_hidden_layers):
        x, _ = layer_cls(self.config, deterministic, name=f"layer_{i}")(x, mask, kv_lengths)
      return x
    scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast),
                      length=self.config.num_hidden_layers,
                      unroll=min(self.config.scan_unroll, self.config.num_hidden_layers))
    x, _ = scanned(self.config, deterministic, name="layer")(x, mask, kv_lengths)
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
def permute_rows(x: Array, order: Array) -> Array:
  """x[b, order[b, i]] for per-row permutations `order` [B, L]; the gradient is the
  inverse permutation's gather, not a scatter-add."""
  return jnp.take_along_axis(x, order[..., None], axis=1)


def _permute_rows_fwd(x, order):
  return permute_rows(x, order), order


def _permute_rows_bwd(order, g):
  inverse = jnp.argsort(order, axis=1)
  return jnp.take_along_axis(g, inverse[..., None], axis=1), None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


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
  Returns (sequence_output [B, L+R, H], sequence_mask [B, L+R], pooled_output [B, H]).
  On the fused-attention path the sequence comes with each row's real positions first
  ([CLS], always real, stays at 0), and the mask returned is in the same order.
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
               deterministic: bool = True) -> tuple[Array, Array, Array]:
    x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic)
    mask = token_mask
    if regions is not None:
      if region_mask is None:
        region_mask = jnp.ones(regions.shape[:2], token_mask.dtype)
      x = jnp.concatenate([x, self.embed_regions(regions, deterministic)], axis=1)
      mask = jnp.concatenate([token_mask, region_mask.astype(token_mask.dtype)], axis=1)
    kv_lengths = None
    if use_fused_attention(self.config, deterministic):
      order, kv_lengths = real_first(mask)
      x = permute_rows(x, order)
      mask = jnp.take_along_axis(mask, order, axis=1)
    seq = self.encoder(x, mask, kv_lengths, deterministic)
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
             region_mask: Array | None = None, deterministic: bool = True) -> Array:
    """Individual (decomposed) encoding of one text or one image -> r [B, H] float32."""
    seq, mask, pooled = self.bert(input_ids, token_type_ids, position_ids, token_mask,
                                  regions, region_mask, deterministic)
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
