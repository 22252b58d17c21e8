"""Every training objective: VLDeformer's decomposing loss (Eq. 1-3), its ablations,
and the joint scorer's matching loss.

All losses take un-normalised embeddings [B, d] and compute in float32 (cosine
similarities, temperature scaling and log-sum-exp), so bfloat16 encoders stay stable.

The decomposing losses are picked by name (`DECOMPOSING_LOSSES`, `config.loss`):
  * 'contrastive' (Eq. 3): over the global batch, in `jax.shard_map`: each device scores
    its local rows against the all-gathered columns of every device (open_clip's
    `local_loss` + `gather_with_grad`), so per-device memory is O(local x global) and
    the loss and gradients equal the single-device full-batch computation (the
    transpose of the tiled all_gather is a psum_scatter that routes gradients back to
    the owning device). `contrastive_loss` is the same row function on one device.
  * 'cosine': the paper's "w/o contrastive" ablation, no negatives.

The joint matching loss (`joint_matching_loss`, Oscar's retrieval objective for the
re-ranker on the same weights) takes the model's pair scorer as a callable, so this
module does not import the model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from vldeformer_jax.sharding import DATA

Array = jax.Array
Part = dict[str, Array]  # one part of a batch: the model inputs of its rows


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / ||x|| along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _softmax_xent_rows(logits: Array, targets: Array) -> Array:
  """-log softmax(logits)[i, targets[i]] per row, in float32."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - picked


# ----------------------------------------------------------------------------------
# The decomposing objective (Eq. 1-3) and its ablation.


def contrastive_row_losses(text_rows: Array, image_rows: Array, text_cols: Array,
                           image_cols: Array, neg_text_cols: Array | None,
                           neg_image_cols: Array | None, row_offset: Array | int,
                           temperature: float | Array) -> tuple[Array, Array]:
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
                     temperature: float | Array = 0.005) -> Array:
  """L = L_t + L_v (Eq. 3) on one device, each the mean over the batch; scalar float32."""
  _check_shapes(text, image, neg_text, neg_image)
  lt, lv = contrastive_row_losses(text, image, text, image, neg_text, neg_image, 0,
                                  temperature)
  return lt.mean() + lv.mean()


def sharded_contrastive_loss(text: Array, image: Array, neg_text: Array | None,
                             neg_image: Array | None, *, mesh: Mesh,
                             temperature: float | Array) -> Array:
  """Eq. 1-3 over the global batch; inputs [B, d] sharded along 'data'. Scalar.
  `temperature` may be a traced scalar (a learned one)."""
  _check_shapes(text, image, neg_text, neg_image)
  negatives = [x for x in (neg_text, neg_image) if x is not None]
  has_neg_text, has_neg_image = neg_text is not None, neg_image is not None

  # A learned temperature is a traced scalar: an operand (replicated); a fixed one
  # stays a compile-time constant, as in the paper's recipe.
  learned = isinstance(temperature, jax.Array)
  operands = ((temperature,) if learned else ()) + (text, image, *negatives)

  def local(*args):
    tau, args = (args[0], args[1:]) if learned else (temperature, args)
    t, v, *negs = args
    gather = lambda x: jax.lax.all_gather(x, DATA, tiled=True)
    negs = iter(negs)
    nt = gather(next(negs)) if has_neg_text else None
    nv = gather(next(negs)) if has_neg_image else None
    offset = jax.lax.axis_index(DATA) * t.shape[0]
    lt, lv = contrastive_row_losses(t, v, gather(t), gather(v), nt, nv, offset, tau)
    global_rows = t.shape[0] * jax.lax.psum(1, DATA)
    return jax.lax.psum(lt.sum() + lv.sum(), DATA) / global_rows

  specs = (P(),) * learned + (P(DATA),) * (2 + len(negatives))
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*operands)


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


def _contrastive(emb: dict[str, Array], *, mesh: Mesh, temperature: float | Array,
                 hard_negatives: bool) -> Array:
  negs = ((emb.get("neg_text"), emb.get("neg_image")) if hard_negatives
          else (None, None))
  return sharded_contrastive_loss(emb["text"], emb["image"], *negs, mesh=mesh,
                                  temperature=temperature)


def _cosine(emb: dict[str, Array], **unused) -> Array:
  del unused  # no negatives, no temperature
  return cosine_loss(emb["text"], emb["image"])


# name -> loss(embeddings of the batch's parts, *, mesh, temperature, hard_negatives).
DECOMPOSING_LOSSES: dict[str, Callable[..., Array]] = {
    "contrastive": _contrastive, "cosine": _cosine}
LOSSES: tuple[str, ...] = tuple(DECOMPOSING_LOSSES)


def decomposing_loss(name: str) -> Callable[..., Array]:
  """The decomposing loss `config.loss` names."""
  if name not in DECOMPOSING_LOSSES:
    raise ValueError(f"--config.loss={name!r} is not one of {LOSSES}")
  return DECOMPOSING_LOSSES[name]


# ----------------------------------------------------------------------------------
# The joint scorer's matching loss (the re-ranker on the same weights).

# match_logits(text part, image part, index) -> [B, 2] joint match logits of the
# aligned rows (index: which call of the step this is, for its dropout key).
MatchLogits = Callable[[Part, Part, int], Array]


def joint_inputs(text: Part, image: Part) -> Part:
  """Oscar's pair input `[CLS] caption [SEP] tags [SEP]` + regions, built on device from
  a text part and an image part (the image's own [CLS] dropped, tags in segment 1,
  tag positions continuing after the caption). The caption's padding stays in the
  middle, masked out, which attention does not see. The host-side twin is
  `inputs.InputBuilder.joint_tokens` (tested equal)."""
  tag_ids = image["input_ids"][:, 1:]
  caption_len = text["token_mask"].sum(axis=1, keepdims=True)
  tag_pos = caption_len + jnp.arange(tag_ids.shape[1])[None, :]
  cat = lambda a, b: jnp.concatenate([a, b], axis=1)
  return dict(input_ids=cat(text["input_ids"], tag_ids),
              token_type_ids=cat(jnp.zeros_like(text["input_ids"]), jnp.ones_like(tag_ids)),
              position_ids=cat(text["position_ids"], tag_pos.astype(jnp.int32)),
              token_mask=cat(text["token_mask"], image["token_mask"][:, 1:]),
              regions=image["regions"], region_mask=image["region_mask"])


def fingerprint(part: Part) -> Array:
  """[B] uint32 hashes, equal for identical inputs and (almost surely) different
  otherwise: integer arithmetic on the token ids and the regions' bits, so identical
  rows hash identically on any backend."""
  def hash_rows(x):
    flat = x.reshape(x.shape[0], -1)
    mults = jax.random.bits(jax.random.key(flat.shape[1]), (flat.shape[1],), jnp.uint32)
    return (flat * (mults | 1)).sum(axis=1, dtype=jnp.uint32)
  ids = (part["input_ids"] * part["token_mask"]).astype(jnp.uint32)
  out = hash_rows(ids)
  if "regions" in part:
    bits = jax.lax.bitcast_convert_type(part["regions"].astype(jnp.float32), jnp.uint32)
    out = out * jnp.uint32(0x9E3779B1) + hash_rows(bits)
  return out


def mined_negatives(text_emb: Array, image_emb: Array, text: Part, image: Part
                    ) -> tuple[Array, Array, Array]:
  """For each pair of the (global) batch, the other image its caption is closest to and
  the other caption its image is closest to under the encoder, as ALBEF mines
  image-text-matching negatives: the re-ranker then trains on the candidates it will
  re-rank. Rows sharing the pair's image or caption (all_pairs sampling, duplicate
  captions) are never chosen. Returns (image index [B], text index [B], valid [B])."""
  sim = jax.lax.stop_gradient(text_emb @ image_emb.T)                  # [B text, B image]
  img_fp, txt_fp = fingerprint(image), fingerprint(text)
  other = (img_fp[:, None] != img_fp[None, :]) & (txt_fp[:, None] != txt_fp[None, :])
  sim = jnp.where(other, sim, -jnp.inf)
  return jnp.argmax(sim, axis=1), jnp.argmax(sim, axis=0), other.any(axis=1)


def joint_matching_loss(match_logits: MatchLogits, batch: dict[str, Part],
                        emb: dict[str, Array], rank_weight: float = 0.0) -> Array:
  """Oscar's retrieval fine-tuning objective for the joint scorer (the re-ranker):
  2-way cross-entropy on aligned pairs (label 1) and mismatched pairs (label 0). The
  mismatched pairs are each caption with the other image the encoder ranks highest for
  it, each image with its highest-ranked other caption (`mined_negatives`) and, when
  the batch has them, the bimodal hard-negative image and text.

  `rank_weight` > 0 adds a listwise term on the score re-ranking uses (l1 - l0, see
  `VLDeformer.score_pairs`): each caption's own image must outscore its negative
  images, and each image's own caption its negative captions (a softmax over the pair
  and its negatives). The 2-way loss calibrates a pair on its own; this term teaches
  the order among the candidates of one query, which is what re-ranking needs.
  """
  # The joint scorer runs on padded pairs: drop the parts' packing indices.
  batch = {part: {k: v for k, v in arrays.items() if k != "pack_index"}
           for part, arrays in batch.items()}
  text, image = batch["text"], batch["image"]
  mined_image, mined_text, valid = mined_negatives(emb["text"], emb["image"], text, image)
  take = lambda part, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), part)
  # (text, image, which rows count [B], the query it competes for: "text" or "image")
  negatives = [(text, take(image, mined_image), valid, "text"),
               (take(text, mined_text), image, valid, "image")]
  if "neg_image" in batch:
    always = jnp.ones_like(valid)
    negatives += [(text, batch["neg_image"], always, "text"),
                  (batch["neg_text"], image, always, "image")]

  logits_of = lambda i, t, v: match_logits(t, v, i).astype(jnp.float32)  # [B, 2]
  positive = logits_of(0, text, image)
  negative = [logits_of(i + 1, t, v) for i, (t, v, _, _) in enumerate(negatives)]
  nll = lambda logits, label: -jax.nn.log_softmax(logits, axis=-1)[:, label]
  weights = jnp.stack([w for _, _, w, _ in negatives]).astype(jnp.float32)  # [N, B]
  negative_nll = jnp.stack([nll(lg, 0) for lg in negative])               # [N, B]
  # Positives and negatives weigh the same, as in Oscar's balanced sampling.
  loss = (0.5 * nll(positive, 1).mean()
          + 0.5 * (negative_nll * weights).sum() / jnp.maximum(weights.sum(), 1.0))
  if rank_weight:
    score = lambda logits: logits[:, 1] - logits[:, 0]
    for query in ("text", "image"):
      rivals = [jnp.where(w, score(lg), -1e9)
                for lg, (_, _, w, q) in zip(negative, negatives) if q == query]
      scores = jnp.stack([score(positive)] + rivals, axis=1)  # [B, 1 + rivals]
      loss += 0.5 * rank_weight * -jax.nn.log_softmax(scores, axis=1)[:, 0].mean()
  return loss
