"""Flax modules: Oscar/VinVL's `BertImgModel` and the VLDeformer heads on top of it.

One parameter set, three uses (see `VLBert`):
  * `encode`: one text or one image (tags + regions) alone -> pooled embedding r_t / r_v;
  * `match_logits`: the early-interaction pair `[CLS] caption [SEP] tags [SEP]` + regions
    -> pooler -> classifier: the VinVL cross-encoder baseline and our re-ranker.

Module and parameter names mirror the PyTorch state dict (`bert.encoder.layer.N....`), so
conversion is a mechanical renaming (see `convert.py`). Numerics follow Oscar: post-LN
layers, exact erf GELU, additive attention mask `(1 - m) * -10000`, LayerNorm eps from
the config, region embeddings with no position or token-type embedding.
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


class SelfAttention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, cfg.num_attention_heads, cfg.head_dim)
    q = split(Dense(cfg.hidden_size, dtype, name="query")(x))
    k = split(Dense(cfg.hidden_size, dtype, name="key")(x))
    v = split(Dense(cfg.hidden_size, dtype, name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim)) + mask_bias  # [B,H,L,L]
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(
        probs, deterministic=deterministic).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, cfg.hidden_size)


class DenseLayerNorm(nn.Module):
  """BERT's `*Output` block: dense, dropout, residual add, LayerNorm (post-LN)."""
  config: ModelConfig
  features: int

  @nn.compact
  def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    dtype = compute_dtype(cfg)
    x = Dense(self.features, dtype, name="dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="LayerNorm")(
        x + residual)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
    h = SelfAttention(self.config, name="self")(x, mask_bias, deterministic)
    return DenseLayerNorm(self.config, self.config.hidden_size, name="output")(
        h, x, deterministic)


class Intermediate(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x = Dense(cfg.intermediate_size, compute_dtype(cfg), name="dense")(x)
    return _activation(cfg.hidden_act)(x)


class Layer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
    x = Attention(self.config, name="attention")(x, mask_bias, deterministic)
    h = Intermediate(self.config, name="intermediate")(x)
    return DenseLayerNorm(self.config, self.config.hidden_size, name="output")(
        h, x, deterministic)


class Encoder(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask_bias: Array, deterministic: bool) -> Array:
    layer_cls = Layer
    if self.config.remat:
      layer_cls = nn.remat(Layer, static_argnums=(3,))  # (self, x, mask, deterministic)
    for i in range(self.config.num_hidden_layers):
      x = layer_cls(self.config, name=f"layer_{i}")(x, mask_bias, deterministic)
    return x


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
    mask_bias = ((1.0 - mask.astype(jnp.float32)) * MASK_VALUE)[:, None, None, :]
    seq = self.encoder(x, mask_bias, deterministic)
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
  text-only checkpoint lacks."""
  ids = jnp.zeros((1, 3), jnp.int32)
  regions = jnp.zeros((1, 1, config.img_feature_dim), jnp.float32)
  return VLBert(config).init(rng, ids, ids, ids, jnp.ones_like(ids), regions,
                             jnp.ones((1, 1), jnp.int32))["params"]


def param_shapes(config: ModelConfig) -> dict[str, Any]:
  """The parameter tree's shapes (jax.ShapeDtypeStruct leaves), without allocating."""
  return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
