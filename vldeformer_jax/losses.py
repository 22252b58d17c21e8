"""Contrastive decomposing objective of VLDeformer (Eq. 1-3) and its ablations.

All losses take un-normalised embeddings [B, d] and compute in float32 (cosine
similarities, temperature scaling and log-sum-exp), so bfloat16 encoders stay stable.

The sharded form (`sharding.sharded_contrastive_loss`) calls `contrastive_row_losses`
on each device's local rows against all-gathered global columns; the single-device
`contrastive_loss` is the same function with rows == columns, so both share one code path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
LOSSES = ("contrastive", "cosine")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _softmax_xent_rows(logits: Array, targets: Array) -> Array:
  """-log softmax(logits)[i, targets[i]] per row, in float32."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - picked


def contrastive_row_losses(text_rows: Array, image_rows: Array, text_cols: Array,
                           image_cols: Array, neg_text_cols: Array | None,
                           neg_image_cols: Array | None, row_offset: Array | int,
                           temperature: float) -> tuple[Array, Array]:
  """Per-row L_t (Eq. 1) and L_v (Eq. 2) for rows [b, d] against columns [B, d].

  Row i is global example `row_offset + i`: its positive is column `row_offset + i`.
  For text i the softmax runs over all B images plus all B hard-negative images; for
  image i over all B texts plus all B hard-negative texts. Returns ([b], [b]).
  """
  t, v = l2_normalize(text_rows), l2_normalize(image_rows)
  img_cols = [l2_normalize(image_cols)]
  txt_cols = [l2_normalize(text_cols)]
  if neg_image_cols is not None:
    img_cols.append(l2_normalize(neg_image_cols))
  if neg_text_cols is not None:
    txt_cols.append(l2_normalize(neg_text_cols))
  targets = row_offset + jnp.arange(t.shape[0])
  logits_t = t @ jnp.concatenate(img_cols).T / temperature  # [b, B or 2B]
  logits_v = v @ jnp.concatenate(txt_cols).T / temperature
  return _softmax_xent_rows(logits_t, targets), _softmax_xent_rows(logits_v, targets)


def contrastive_loss(text: Array, image: Array, neg_text: Array | None = None,
                     neg_image: Array | None = None,
                     temperature: float = 0.005) -> Array:
  """L = L_t + L_v (Eq. 3), each the mean over the batch; scalar float32."""
  _check_shapes(text, image, neg_text, neg_image)
  lt, lv = contrastive_row_losses(text, image, text, image, neg_text, neg_image, 0,
                                  temperature)
  return lt.mean() + lv.mean()


def cosine_loss(text: Array, image: Array) -> Array:
  """The paper's "w/o contrastive" ablation: pull aligned pairs together only,
  mean(1 - cos(r_t^i, r_v^i)); no negatives."""
  _check_shapes(text, image, None, None)
  return jnp.mean(1.0 - jnp.sum(l2_normalize(text) * l2_normalize(image), axis=-1))


def _check_shapes(text, image, neg_text, neg_image) -> None:
  """Static shape checks (they run at trace time under jit)."""
  if text.ndim != 2 or text.shape != image.shape:
    raise ValueError(f"text {text.shape} and image {image.shape} must both be [B, d]")
  for name, neg in (("neg_text", neg_text), ("neg_image", neg_image)):
    if neg is not None and neg.shape != text.shape:
      raise ValueError(f"{name} has shape {neg.shape}, expected {text.shape}")
