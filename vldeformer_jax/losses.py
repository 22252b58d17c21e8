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
                           temperature: float | Array,
                           exclude: tuple[Array, Array] | None = None
                           ) -> tuple[Array, Array]:
  """Per-row L_t (Eq. 1) and L_v (Eq. 2) for rows [b, d] against columns [B, d].

  Row i is global example `row_offset + i`: its positive is column `row_offset + i`.
  For text i the softmax runs over all B images plus all B hard-negative images; for
  image i over all B texts plus all B hard-negative texts. `exclude` (text rows', image
  rows' [b, B or 2B] bool) leaves columns out of the softmax (likely false negatives
  a teacher found; never the positive). Returns ([b], [b]).
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
  if exclude is not None:
    logits_t = jnp.where(exclude[0], -1e9, logits_t)
    logits_v = jnp.where(exclude[1], -1e9, logits_v)
  return _softmax_xent_rows(logits_t, targets), _softmax_xent_rows(logits_v, targets)


def contrastive_loss(text: Array, image: Array, neg_text: Array | None = None,
                     neg_image: Array | None = None,
                     temperature: float | Array = 0.005,
                     exclude: tuple[Array, Array] | None = None) -> Array:
  """L = L_t + L_v (Eq. 3) on one device, each the mean over the batch; scalar float32."""
  _check_shapes(text, image, neg_text, neg_image)
  lt, lv = contrastive_row_losses(text, image, text, image, neg_text, neg_image, 0,
                                  temperature, exclude)
  return lt.mean() + lv.mean()


def sharded_contrastive_loss(text: Array, image: Array, neg_text: Array | None,
                             neg_image: Array | None, *, mesh: Mesh,
                             temperature: float | Array,
                             exclude: tuple[Array, Array] | None = None) -> Array:
  """Eq. 1-3 over the global batch; inputs [B, d] sharded along 'data', `exclude`
  ([B, B or 2B] bool each, rows sharded the same) as in `contrastive_row_losses`.
  Scalar. `temperature` may be a traced scalar (a learned one)."""
  _check_shapes(text, image, neg_text, neg_image)
  negatives = [x for x in (neg_text, neg_image) if x is not None]
  has_neg_text, has_neg_image = neg_text is not None, neg_image is not None
  # A learned temperature is a traced scalar: an operand (replicated); a fixed one
  # stays a compile-time constant, as in the paper's recipe.
  learned = isinstance(temperature, jax.Array)
  excluding = exclude is not None
  operands = (((temperature,) if learned else ()) + (text, image, *negatives)
              + (tuple(exclude) if excluding else ()))

  def local(*args):
    tau, args = (args[0], args[1:]) if learned else (temperature, args)
    t, v, *rest = args
    negs = iter(rest[:len(negatives)])
    skip = tuple(rest[len(negatives):]) if excluding else None
    gather = lambda x: jax.lax.all_gather(x, DATA, tiled=True)
    nt = gather(next(negs)) if has_neg_text else None
    nv = gather(next(negs)) if has_neg_image else None
    offset = jax.lax.axis_index(DATA) * t.shape[0]
    lt, lv = contrastive_row_losses(t, v, gather(t), gather(v), nt, nv, offset, tau,
                                    skip)
    global_rows = t.shape[0] * jax.lax.psum(1, DATA)
    return jax.lax.psum(lt.sum() + lv.sum(), DATA) / global_rows

  specs = ((P(),) * learned + (P(DATA),) * (2 + len(negatives))
           + (P(DATA),) * (2 * excluding))
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
                 hard_negatives: bool, exclude: tuple[Array, Array] | None = None
                 ) -> Array:
  negs = ((emb.get("neg_text"), emb.get("neg_image")) if hard_negatives
          else (None, None))
  return sharded_contrastive_loss(emb["text"], emb["image"], *negs, mesh=mesh,
                                  temperature=temperature, exclude=exclude)


def _cosine(emb: dict[str, Array], **unused) -> Array:
  del unused  # no negatives, no temperature
  return cosine_loss(emb["text"], emb["image"])


# name -> loss(embeddings of the batch's parts, *, mesh, temperature, hard_negatives,
# exclude); `exclude` (columns left out as false negatives) only for 'contrastive'.
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
  other = other_pairs(text, image)
  sim = jnp.where(other, sim, -jnp.inf)
  return jnp.argmax(sim, axis=1), jnp.argmax(sim, axis=0), other.any(axis=1)


def other_pairs(text: Part, image: Part) -> Array:
  """[B, B] bool: row i's pair shares neither its image nor its caption with pair j
  (all_pairs sampling and duplicate captions repeat them), so j can be i's negative."""
  img_fp, txt_fp = fingerprint(image), fingerprint(text)
  return (img_fp[:, None] != img_fp[None, :]) & (txt_fp[:, None] != txt_fp[None, :])


def closest_others(sim: Array, other: Array, k: int) -> tuple[Array, Array]:
  """Each row's k highest-scoring columns among its `other` ones (sim, other: [B, B]):
  (indices [B, k], valid [B, k]; False where a row has fewer than k others)."""
  scores, idx = jax.lax.top_k(jnp.where(other, sim, -jnp.inf), k)
  return idx, jnp.isfinite(scores)


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


# ----------------------------------------------------------------------------------
# Distillation from a teacher's scores of each query's candidates.

DISTILL_LOSSES = ("kl", "margin_mse")


def false_negatives(teacher: Array, valid: Array, margin: float | None) -> Array:
  """[Q, C] bool: candidates (columns >= 1; column 0 is the query's positive) that the
  teacher scores above the positive by more than `margin`: likely false negatives
  (RocketQA's denoising). None: none dropped."""
  if margin is None:
    return jnp.zeros_like(valid)
  above = teacher - teacher[:, :1] > margin
  return above & valid & (jnp.arange(valid.shape[1]) > 0)[None, :]


def kl_distill_loss(student: Array, teacher: Array, valid: Array,
                    temperature: float) -> Array:
  """T^2 KL(softmax(teacher / T) || softmax(student / T)) over each query's valid
  candidates (LightningDOT's listwise distillation), mean over queries; scores [Q, C]
  are logits (column 0: the positive). The teacher gets no gradient."""
  t = temperature
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  mask = lambda x: jnp.where(valid, x, -1e9)  # finite: no NaN in any gradient
  log_p_t = jax.nn.log_softmax(mask(teacher / t), axis=1)
  log_p_s = jax.nn.log_softmax(mask(student.astype(jnp.float32) / t), axis=1)
  terms = jnp.where(valid, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0)
  return t * t * terms.sum(axis=1).mean()


def margin_mse_distill_loss(student: Array, teacher: Array, valid: Array) -> Array:
  """Margin-MSE (Hofstaetter et al.): the student's margins (positive minus each valid
  candidate) regressed on the teacher's, mean over every valid (query, candidate);
  scores [Q, C], column 0 the positive. The teacher gets no gradient."""
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  margin = lambda x: x[:, :1] - x[:, 1:]
  pairs = valid[:, 1:].astype(jnp.float32)
  squares = (margin(student) - margin(teacher)) ** 2
  return (squares * pairs).sum() / jnp.maximum(pairs.sum(), 1.0)


def rank_agreement(student: Array, teacher: Array, valid: Array) -> Array:
  """The share of valid candidate pairs of a query that student and teacher order the
  same way (pairs the teacher ties are left out); scalar over all queries."""
  ds = student[:, :, None] - student[:, None, :]
  dt = teacher[:, :, None] - teacher[:, None, :]
  pairs = valid[:, :, None] & valid[:, None, :] & (dt > 0)
  agree = pairs & (ds > 0)
  return agree.sum() / jnp.maximum(pairs.sum(), 1)


def distillation_loss(name: str, student: Array, teacher: Array, valid: Array, *,
                      temperature: float, false_negative_margin: float | None
                      ) -> tuple[Array, Array, dict[str, Array]]:
  """The distillation term `name` (DISTILL_LOSSES) over candidates [Q, C] (column 0
  the positive), after dropping the teacher's likely false negatives. Returns (loss,
  dropped [Q, C], metrics: the share dropped, rank agreement on the kept ones)."""
  dropped = false_negatives(teacher, valid, false_negative_margin)
  kept = valid & ~dropped
  if name == "kl":
    loss = kl_distill_loss(student, teacher, kept, temperature)
  elif name == "margin_mse":
    loss = margin_mse_distill_loss(student, teacher, kept)
  else:
    raise ValueError(f"--config.distill_loss={name!r} is not one of {DISTILL_LOSSES}")
  negatives = jnp.maximum((valid[:, 1:]).sum(), 1)
  metrics = {"dropped_frac": dropped.sum() / negatives,
             "rank_agreement": rank_agreement(jax.lax.stop_gradient(student),
                                              jax.lax.stop_gradient(teacher), kept)}
  return loss, dropped, metrics
