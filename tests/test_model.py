"""Numeric parity of the Flax model with PyTorch references nobody here wrote."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp

import vldeformer_jax as vld
from vldeformer_jax import convert
from vldeformer_jax.config import ModelConfig
from vldeformer_jax.model import VLBert, init_params

from conftest import make_oscar_checkpoint, tiny_bert_config_dict

CAPTIONS = [
    "a black dog",
    "A man is sitting on a bench, reading the newspaper.",
    "Two small dogs run quickly across the wet grass!!",
    "Ünïcödé café — naïve façade, 日本語 and emoji 😀 too",
    "what's this? it's a dog's ball; (maybe) -- isn't it...",
    " ".join(["an extremely long caption about a dog"] * 30),  # truncated at 70
    "x",
]


def _hf_reference(config_dict: dict, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.BertModel(
      transformers.BertConfig(**config_dict, attn_implementation="eager")).eval()
  with torch.no_grad():  # non-trivial LayerNorm values
    for name, p in model.named_parameters():
      if "LayerNorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def test_bert_parity_random_tiny_config():
  cfg_dict = tiny_bert_config_dict(vocab_size=99)
  ref = _hf_reference(cfg_dict)
  config = ModelConfig.from_dict(cfg_dict)
  params, report = convert.from_state_dict(
      {k: v.numpy() for k, v in ref.state_dict().items()}, config, "hf-random")
  assert report.kind == "bert"

  rng = np.random.default_rng(0)
  ids = rng.integers(0, 99, size=(3, 17)).astype(np.int32)
  types = rng.integers(0, 2, size=(3, 17)).astype(np.int32)
  mask = np.ones((3, 17), np.int32)
  mask[1, 9:] = 0
  mask[2, 3:] = 0
  pos = np.broadcast_to(np.arange(17, dtype=np.int32), (3, 17))
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
              token_type_ids=torch.tensor(types, dtype=torch.long),
              attention_mask=torch.tensor(mask))
  seq, _, pooled = VLBert(config).apply(
      {"params": params}, ids, types, pos, mask,
      method=lambda m, *a: m.bert(*a))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(seq)[valid],
                             out.last_hidden_state.numpy()[valid], atol=1e-5)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-5)


def test_minilm_encode_text_matches_transformers(minilm_src, minilm_dir):
  model = vld.load_pretrained(minilm_dir)
  ours = model.encode_text(CAPTIONS)
  tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_src))
  ref = transformers.BertModel.from_pretrained(str(minilm_src)).eval()
  enc = tok(CAPTIONS, padding=True, truncation=True, max_length=70, return_tensors="pt")
  assert enc["input_ids"].shape[1] == 70  # the long caption really is truncated
  with torch.no_grad():
    h = ref(**enc).last_hidden_state
  m = enc["attention_mask"][..., None].float()
  expected = torch.tanh((h * m).sum(1) / m.sum(1)).numpy()
  assert ours.shape == (len(CAPTIONS), 384) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_tokenizer_matches_known_ids_and_transformers(minilm_src, minilm_dir):
  model = vld.load_pretrained(minilm_dir)
  ids = model.inputs.text_sequences(["a black dog"])[0][0]
  assert ids == [101, 1037, 2304, 3899, 102]
  tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_src))
  for cap in CAPTIONS:
    expected = tok(cap, truncation=True, max_length=70)["input_ids"]
    assert model.inputs.text_sequences([cap])[0][0] == expected


def test_joint_layout_matches_bert_pair_encoding(minilm_src, minilm_dir):
  """Oscar's joint input is BERT's sentence-pair layout: [CLS] a [SEP] b [SEP], 0/1."""
  model = vld.load_pretrained(minilm_dir)
  tok = transformers.BertTokenizerFast.from_pretrained(str(minilm_src))
  cap, tags = "A man sitting on a bench", "man bench tree tennis racket"
  ids, segs = model.inputs.joint_sequences([cap], [tags])[0]
  ref = tok(cap, tags)
  assert ids == ref["input_ids"] and segs == ref["token_type_ids"]
  # Image alone: [CLS] tags [SEP], tags (and their SEP) in segment tag_segment_id.
  ids, segs = model.inputs.image_sequences([tags])[0]
  ref = tok(tags)
  assert ids == ref["input_ids"]
  assert segs == [0] + [1] * (len(ids) - 1)


def test_encoding_does_not_depend_on_batch_composition(minilm_dir):
  model = vld.load_pretrained(minilm_dir, batch_size=4)
  together = model.encode_text(CAPTIONS)
  alone = np.concatenate([model.encode_text([c]) for c in CAPTIONS])
  reversed_ = model.encode_text(CAPTIONS[::-1])[::-1]
  np.testing.assert_allclose(alone, together, atol=2e-6)
  np.testing.assert_allclose(reversed_, together, atol=2e-6)
  assert model.encode_text([]).shape == (0, 384)


def test_bfloat16_close_to_float32(minilm_dir):
  f32 = vld.load_pretrained(minilm_dir).encode_text(CAPTIONS)
  bf16 = vld.load_pretrained(minilm_dir, dtype="bfloat16").encode_text(CAPTIONS)
  cos = (f32 * bf16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(bf16, axis=1)
  assert cos.min() > 0.99, cos
  assert np.abs(f32 - bf16).max() < 0.05


def test_remat_gives_the_same_outputs(minilm_dir):
  a = vld.load_pretrained(minilm_dir).encode_text(CAPTIONS[:3])
  b = vld.load_pretrained(minilm_dir, remat=True).encode_text(CAPTIONS[:3])
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_per_layer_layout_computes_the_scanned_encoder():
  """`scan_layers=False` over `unstack_layers(params)` (what `VLDeformer` runs) gives
  the scanned encoder's outputs, and the layouts convert back and forth exactly."""
  from vldeformer_jax.model import unstack_layers
  from vldeformer_jax.model_dir import flatten, stack_per_layer_keys
  config = ModelConfig(**tiny_bert_config_dict(100), img_feature_dim=12, max_regions=5)
  params = jax.device_get(init_params(config, jax.random.key(0)))
  per_layer = unstack_layers(params)
  assert set(per_layer["bert"]["encoder"]) == {f"layer_{i}" for i in range(
      config.num_hidden_layers)}
  flat = flatten(params)
  back = stack_per_layer_keys(flatten(per_layer))
  assert back.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 90, (3, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  inputs = dict(input_ids=ids, token_type_ids=np.zeros_like(ids),
                position_ids=np.broadcast_to(np.arange(9, dtype=np.int32), ids.shape),
                token_mask=mask, regions=rng.normal(size=(3, 4, 12)).astype(np.float32),
                region_mask=np.ones((3, 4), np.int32))
  for method in (VLBert.encode, VLBert.match_logits):
    scanned = VLBert(config).apply({"params": params}, **inputs, method=method)
    straight = VLBert(config.replace(scan_layers=False)).apply(
        {"params": per_layer}, **inputs, method=method)
    np.testing.assert_allclose(straight, scanned, atol=2e-6)
  with pytest.raises(Exception, match="layer"):  # the layouts are not interchangeable
    VLBert(config.replace(scan_layers=False)).apply({"params": params}, **inputs,
                                                    method=VLBert.encode)


def test_inference_reads_layer_weights_in_place(minilm_dir):
  """A scanned layer's weights are slices of the stacked arrays, which XLA copies out
  on every call; `VLDeformer`'s compiled encoder reads each layer's own arrays."""
  import re
  model = vld.load_pretrained(minilm_dir)
  batch = model.text_batch(CAPTIONS[:1])
  hidden, inter = model.config.hidden_size, model.config.intermediate_size
  kernel_slice = re.compile(rf"f32\[1,({hidden},{inter}|{inter},{hidden}|{hidden},{hidden})\]"
                            r"\S* (dynamic-)?slice\(")
  ours = model.encode_fn.lower({"params": model.params}, **batch).compile().as_text()
  assert not kernel_slice.search(ours)
  from vldeformer_jax.model_dir import load_model_dir
  _, stacked, _ = load_model_dir(minilm_dir)
  scanned = jax.jit(lambda p, b: VLBert(model.config).apply(
      {"params": p}, **b, method=VLBert.encode)).lower(stacked, batch).compile().as_text()
  assert kernel_slice.search(scanned)  # what the check would catch


class OscarReference(torch.nn.Module):
  """Oscar's BertImgModel + classifier, assembled from transformers' BERT modules and
  plain nn.Linear / nn.LayerNorm as the notes describe it."""

  def __init__(self, state: dict, cfg: dict):
    super().__init__()
    self.bert = transformers.BertModel(
        transformers.BertConfig(**cfg, attn_implementation="eager")).eval()
    self.bert.load_state_dict({k[len("bert."):]: v for k, v in state.items()
                               if k.startswith("bert.") and "img_embedding" not in k
                               and not k.startswith("bert.LayerNorm")}, strict=False)
    hidden, dim = cfg["hidden_size"], cfg["img_feature_dim"]
    self.img_embedding = torch.nn.Linear(dim, hidden)
    self.img_embedding.load_state_dict({"weight": state["bert.img_embedding.weight"],
                                        "bias": state["bert.img_embedding.bias"]})
    self.img_ln = None
    if cfg["use_img_layernorm"]:
      self.img_ln = torch.nn.LayerNorm(hidden, eps=cfg["img_layer_norm_eps"])
      self.img_ln.load_state_dict({"weight": state["bert.LayerNorm.weight"],
                                   "bias": state["bert.LayerNorm.bias"]})
    self.classifier = torch.nn.Linear(hidden, 2)
    self.classifier.load_state_dict({"weight": state["classifier.weight"],
                                     "bias": state["classifier.bias"]})

  @torch.no_grad()
  def forward(self, batch):
    t = lambda k: torch.tensor(np.asarray(batch[k]), dtype=torch.long)
    x = self.bert.embeddings(input_ids=t("input_ids"), token_type_ids=t("token_type_ids"),
                             position_ids=t("position_ids"))
    r = self.img_embedding(torch.tensor(batch["regions"]))
    if self.img_ln is not None:
      r = self.img_ln(r)
    x = torch.cat([x, r], dim=1)
    mask = torch.cat([t("token_mask"), t("region_mask")], dim=1).float()
    ext = ((1.0 - mask) * -10000.0)[:, None, None, :]
    seq = self.bert.encoder(x, attention_mask=ext).last_hidden_state
    pooled = self.bert.pooler(seq)
    mean = torch.tanh((seq * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    logits = self.classifier(pooled)
    return mean.numpy(), pooled.numpy(), (logits[:, 1] - logits[:, 0]).numpy(), seq, mask


@pytest.mark.parametrize("use_img_layernorm", [False, True])
def test_image_and_joint_paths_match_oscar_reference(tmp_path, vocab_file,
                                                     use_img_layernorm):
  src = tmp_path / "oscar"
  state = make_oscar_checkpoint(src, vocab_file, use_img_layernorm)
  report = convert.convert_to_model_dir(src, tmp_path / "model")
  assert report.kind == "oscar" and report.initialised == []
  assert set(report.dropped) >= {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
  cfg = __import__("json").loads((src / "config.json").read_text())
  ref = OscarReference(state, cfg)
  model = vld.load_pretrained(tmp_path / "model", batch_size=8)

  rng = np.random.default_rng(1)
  captions = ["a man sitting on a bench", "two dogs on the grass", "a red bus"]
  tags = ["man bench", "dog dog grass tree", "bus street car sky person"]
  regions = [rng.normal(size=(n, 12)).astype(np.float32) for n in (2, 4, 5)]

  # Individual image encoding (masked mean + tanh) against the reference.
  ours_img = model.encode_image(tags, regions)
  batch = model.inputs.batch(model.inputs.image_sequences(tags), regions,
                             num_regions=5).as_dict()
  expected_img, *_ = ref(batch)
  np.testing.assert_allclose(ours_img, expected_img, atol=1e-5)

  # Joint scoring: classifier logit on the pooler of the concatenated pair.
  ours_joint = model.score_pairs(captions, tags, regions)
  batch = model.inputs.batch(model.inputs.joint_sequences(captions, tags), regions,
                             num_regions=5).as_dict()
  _, _, expected_logit, *_ = ref(batch)
  np.testing.assert_allclose(ours_joint, expected_logit, atol=1e-5)

  # Text encoding uses the very same weights.
  ours_txt = model.encode_text(captions)
  batch = model.inputs.batch(model.inputs.text_sequences(captions)).as_dict()
  with torch.no_grad():
    h = ref.bert(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["token_mask"])).last_hidden_state
  m = torch.tensor(batch["token_mask"])[..., None].float()
  np.testing.assert_allclose(ours_txt, torch.tanh((h * m).sum(1) / m.sum(1)).numpy(),
                             atol=1e-5)


def test_pooling_variants_match_reference(tmp_path, vocab_file):
  src = tmp_path / "oscar"
  state = make_oscar_checkpoint(src, vocab_file, use_img_layernorm=True)
  convert.convert_to_model_dir(src, tmp_path / "model")
  cfg = __import__("json").loads((src / "config.json").read_text())
  ref = OscarReference(state, cfg)
  rng = np.random.default_rng(2)
  tags = ["man bench", "dog grass tree"]
  regions = [rng.normal(size=(n, 12)).astype(np.float32) for n in (3, 1)]

  cls_model = vld.load_pretrained(tmp_path / "model", pooling="cls")
  batch = cls_model.inputs.batch(cls_model.inputs.image_sequences(tags), regions,
                                 num_regions=3).as_dict()
  _, pooled, *_ = ref(batch)
  np.testing.assert_allclose(cls_model.encode_image(tags, regions), pooled, atol=1e-5)

  # The released code's unmasked mean: over every position of the fixed-size input.
  um = vld.load_pretrained(tmp_path / "model", pooling="mean_unmasked")
  cfgm = um.config
  batch = um.inputs.batch(um.inputs.image_sequences(tags), regions,
                          length=cfgm.max_tag_len, num_regions=cfgm.max_regions).as_dict()
  *_, seq, _ = ref(batch)
  expected = torch.tanh(seq.mean(1)).numpy()
  np.testing.assert_allclose(um.encode_image(tags, regions), expected, atol=1e-5)
  # ... which, unlike the masked mean, depends on the padding: the two differ.
  masked = vld.load_pretrained(tmp_path / "model").encode_image(tags, regions)
  assert np.abs(masked - expected).max() > 1e-3


def test_regions_beyond_max_are_dropped_like_oscar(tmp_path, vocab_file):
  src = tmp_path / "oscar"
  make_oscar_checkpoint(src, vocab_file, use_img_layernorm=False)
  convert.convert_to_model_dir(src, tmp_path / "model")
  model = vld.load_pretrained(tmp_path / "model", max_regions=4)
  regions = np.random.default_rng(3).normal(size=(7, 12)).astype(np.float32)
  np.testing.assert_allclose(model.encode_image(["dog"], [regions]),
                             model.encode_image(["dog"], [regions[:4]]), atol=1e-6)


def test_bad_regions_are_rejected(minilm_dir):
  model = vld.load_pretrained(minilm_dir)
  with pytest.raises(ValueError, match=r"regions\[0\] has shape"):
    model.encode_image(["dog"], [np.zeros((3, 7), np.float32)])
  bad = np.zeros((2, 2054), np.float32)
  bad[1, 5] = np.nan
  with pytest.raises(ValueError, match=r"regions\[0\] contains NaN"):
    model.encode_image(["dog"], [bad])
  with pytest.raises(ValueError, match="1 tag strings but 2 region arrays"):
    model.encode_image(["dog"], [bad, bad])
  with pytest.raises(TypeError, match="single str"):
    model.encode_text("a single string")


def test_init_params_follow_bert_initialisation():
  config = ModelConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=128, img_feature_dim=8)
  params = init_params(config, jax.random.key(0))
  k = np.asarray(params["bert"]["encoder"]["layer"]["intermediate"]["dense"]["kernel"])
  assert abs(k.std() - 0.02) < 0.003
  assert np.all(np.asarray(params["classifier"]["bias"]) == 0)
  assert jnp.asarray(params["bert"]["pooler"]["dense"]["kernel"]).dtype == jnp.float32


def test_encoding_sharded_over_devices_equals_single_device(minilm_dir):
  from vldeformer_jax.sharding import make_mesh
  single = vld.load_pretrained(minilm_dir, batch_size=4).encode_text(CAPTIONS)
  sharded = vld.load_pretrained(minilm_dir, batch_size=4, mesh=make_mesh(4))
  np.testing.assert_allclose(sharded.encode_text(CAPTIONS), single, atol=2e-6)


# --------------------------------------------------------------- the fused attention path
FUSED_TEST = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, img_feature_dim=6,
                         dtype="bfloat16", attention_probs_dropout_prob=0.0)


def _fused_inputs():
  rng = np.random.default_rng(0)
  b, length, r = 4, 7, 5
  ids = rng.integers(1, 50, (b, length)).astype(np.int32)
  token_mask = (np.arange(length)[None] < rng.integers(2, length + 1, (b, 1))).astype(np.int32)
  token_mask[1, 3] = 0  # padding inside the tokens, as joint inputs have
  region_mask = (np.arange(r)[None] < rng.integers(1, r + 1, (b, 1))).astype(np.int32)
  regions = rng.normal(size=(b, r, 6)).astype(np.float32)
  positions = np.tile(np.arange(length, dtype=np.int32), (b, 1))
  return ids, np.zeros_like(ids), positions, token_mask, regions, region_mask


@pytest.fixture
def cudnn_calls(monkeypatch) -> list:
  """`jax.nn.dot_product_attention` calls served by jax's XLA implementation (cuDNN
  needs a GPU); the list collects the implementation each call asked for."""
  real = jax.nn.dot_product_attention
  calls = []

  def xla_stand_in(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_stand_in)
  return calls


@pytest.mark.parametrize("pooling", ["mean", "cls", "mean_unmasked"])
def test_fused_attention_path_computes_the_explicit_attention(cudnn_calls, pooling):
  """The cuDNN path (real positions moved first, padding given as key counts) against
  the explicit masked softmax, values and gradients. cuDNN needs a GPU, so here the
  kernel call is served by jax's XLA implementation of the same function."""
  params = init_params(FUSED_TEST, jax.random.key(0))
  inputs = _fused_inputs()
  out, grads = {}, {}
  for impl in ("xla", "cudnn"):
    module = VLBert(FUSED_TEST.replace(attention_impl=impl, pooling=pooling))
    f = lambda p: module.apply({"params": p}, *inputs, method=VLBert.encode)
    out[impl] = np.asarray(f(params))
    g = jax.grad(lambda p: f(p).sum())(params)
    grads[impl] = np.asarray(g["bert"]["encoder"]["layer"]["attention"]["self"]["query"]
                             ["kernel"], np.float32)
  assert cudnn_calls and set(cudnn_calls) == {"cudnn"}
  np.testing.assert_allclose(out["cudnn"], out["xla"], atol=1e-4)
  np.testing.assert_allclose(grads["cudnn"], grads["xla"], atol=1e-5)


def test_fused_attention_choice():
  from vldeformer_jax.model import use_fused_attention
  # 'auto' on this CPU backend: the explicit path.
  assert not use_fused_attention(FUSED_TEST, deterministic=True)
  assert use_fused_attention(FUSED_TEST.replace(attention_impl="cudnn"), deterministic=False)
  dropping = FUSED_TEST.replace(attention_impl="cudnn", attention_probs_dropout_prob=0.1)
  assert use_fused_attention(dropping, deterministic=True)  # eval: no dropout to drop
  with pytest.raises(ValueError, match="no attention-probability dropout"):
    use_fused_attention(dropping, deterministic=False)
  with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
    use_fused_attention(FUSED_TEST.replace(attention_impl="cudnn", dtype="float32"), True)
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    FUSED_TEST.replace(attention_impl="flash")


def test_permute_rows_gradient_is_the_inverse_permutation():
  from vldeformer_jax.model import permute_rows, real_first
  mask = jnp.array([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]])
  order, count = real_first(mask)
  np.testing.assert_array_equal(order, [[0, 2, 3, 1, 4], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(count, [3, 5])
  x = jax.random.normal(jax.random.key(0), (2, 5, 3))
  w = jax.random.normal(jax.random.key(1), (2, 5, 3))
  loss = lambda x: (permute_rows(x, order) * w).sum()
  reference = lambda x: (jnp.take_along_axis(x, order[..., None], axis=1) * w).sum()
  np.testing.assert_allclose(jax.grad(loss)(x), jax.grad(reference)(x))


def _packing_inputs(rows: int = 4):
  """Texts and images of uneven lengths (one row all padding but [CLS]), with a
  region-less row, as the trainer hands them out."""
  rng = np.random.default_rng(3)
  length, regions = 9, 4
  ids = rng.integers(5, 90, (rows, length)).astype(np.int32)
  token_mask = (np.arange(length)[None] < rng.integers(1, length + 1, (rows, 1))
                ).astype(np.int32)
  token_mask[0, :] = 1
  token_mask[1, 1:] = 0
  region_mask = (np.arange(regions)[None] < rng.integers(0, regions + 1, (rows, 1))
                 ).astype(np.int32)
  region_mask[0, :] = 0
  return dict(input_ids=ids * token_mask, token_type_ids=np.zeros_like(ids),
              position_ids=np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape),
              token_mask=token_mask,
              regions=rng.normal(size=(rows, regions, 12)).astype(np.float32),
              region_mask=region_mask)


def test_pack_index_lists_each_groups_real_positions():
  from vldeformer_jax.inputs import pack_index
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(pack_index(mask, 1, 7), [[0, 1, 3, 6, 7, 8, 12]])
  np.testing.assert_array_equal(pack_index(mask, 2, 4), [[0, 1, 3, 6], [0, 1, 2, 6]])
  with pytest.raises(ValueError, match="group 0 holds 3 real positions, more than its 2"):
    pack_index(mask, 2, 2)
  with pytest.raises(ValueError, match="4 rows do not split into 3 packing groups"):
    pack_index(mask, 3, 4)


@pytest.mark.parametrize("scan_layers", [pytest.param(True, marks=pytest.mark.slow), False])
@pytest.mark.parametrize("groups,slots", [pytest.param(1, 40, marks=pytest.mark.slow),
                                          (2, 24)])
def test_packed_tokens_compute_the_padded_encoder(scan_layers, groups, slots):
  """Packing (the layers on the real tokens only) computes the padded model's function
  with the same dropout masks: outputs and gradients match with dropout on, for text
  and image parts, one or several groups, unused slots included, both layouts."""
  from vldeformer_jax.inputs import pack_index, sequence_mask
  from vldeformer_jax.model import unstack_layers
  config = ModelConfig(**tiny_bert_config_dict(100), img_feature_dim=12, max_regions=5,
                       scan_layers=scan_layers)
  params = init_params(config, jax.random.key(0))
  if not scan_layers:
    params = unstack_layers(params)
  image = _packing_inputs()
  text = {k: v for k, v in image.items() if not k.startswith("region")}
  module = VLBert(config)
  for inputs in (text, image):
    packed = {**inputs, "pack_index": pack_index(sequence_mask(inputs), groups, slots)}
    for deterministic in (True, False):
      def loss(p, batch):
        r = module.apply({"params": p}, **batch, deterministic=deterministic,
                         rngs={"dropout": jax.random.key(7)}, method=VLBert.encode)
        return (r * jnp.arange(r.size).reshape(r.shape)).sum(), r
      (_, want), want_g = jax.value_and_grad(loss, has_aux=True)(params, inputs)
      (_, got), got_g = jax.value_and_grad(loss, has_aux=True)(params, packed)
      np.testing.assert_allclose(got, want, atol=2e-6)
      for (path, g), other in zip(jax.tree_util.tree_leaves_with_path(want_g),
                                  jax.tree.leaves(got_g)):
        np.testing.assert_allclose(other, g, atol=1e-6 * np.abs(g).max() + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_packed_tokens_on_the_fused_attention_path(cudnn_calls):
  """With packing, the cuDNN path takes the packed rows' lengths as key counts (here
  served by jax's XLA implementation, as in the test above)."""
  from vldeformer_jax.inputs import pack_index, sequence_mask
  inputs = _packing_inputs()
  inputs["input_ids"] = inputs["input_ids"] % FUSED_TEST.vocab_size
  inputs["regions"] = np.zeros((4, 4, FUSED_TEST.img_feature_dim), np.float32) + 0.1
  params = init_params(FUSED_TEST, jax.random.key(0))
  encode = lambda impl, batch: VLBert(FUSED_TEST.replace(attention_impl=impl)).apply(
      {"params": params}, **batch, method=VLBert.encode)
  packed = {**inputs, "pack_index": pack_index(sequence_mask(inputs), 2, 16)}
  np.testing.assert_allclose(encode("cudnn", packed), encode("xla", inputs), atol=1e-4)
  assert cudnn_calls and set(cudnn_calls) == {"cudnn"}


def test_packing_refuses_the_unmasked_mean():
  from vldeformer_jax.inputs import pack_index, sequence_mask
  config = ModelConfig(**tiny_bert_config_dict(100), img_feature_dim=12, max_regions=5,
                       pooling="mean_unmasked")
  inputs = _packing_inputs()
  with pytest.raises(ValueError, match="mean_unmasked.*packing"):
    VLBert(config).apply({"params": init_params(config, jax.random.key(0))}, **inputs,
                         pack_index=pack_index(sequence_mask(inputs), 1, 40),
                         method=VLBert.encode)
