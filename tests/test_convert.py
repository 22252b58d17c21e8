"""Checkpoint conversion: mapping, round trip, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import jax
import pytest

torch = pytest.importorskip("torch")

import vldeformer_jax as vld
from vldeformer_jax import convert
from vldeformer_jax.model_dir import ModelDirError, load_model_dir
from vldeformer_jax.config import ModelConfig

from conftest import make_oscar_checkpoint, run_bin


def test_torch_key_mapping():
  assert (convert.torch_key("bert/encoder/layer/attention/self/query/kernel", 11)
          == "bert.encoder.layer.11.attention.self.query.weight")
  assert convert.torch_keys("bert/encoder/layer/output/dense/bias", 2) == [
      "bert.encoder.layer.0.output.dense.bias", "bert.encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match="layer index"):
    convert.torch_key("bert/encoder/layer/output/dense/bias")
  assert convert.torch_key("bert/LayerNorm/scale") == "bert.LayerNorm.weight"
  assert (convert.torch_key("bert/embeddings/word_embeddings/embedding")
          == "bert.embeddings.word_embeddings.weight")
  assert convert.torch_key("classifier/bias") == "classifier.bias"


def test_round_trip_pytorch_flax_pytorch_is_bit_exact(tmp_path, vocab_file):
  src = tmp_path / "oscar"
  state = make_oscar_checkpoint(src, vocab_file, use_img_layernorm=True)
  run_bin("convert", str(src), str(tmp_path / "model"))
  proc = run_bin("convert", "--to-pytorch", str(tmp_path / "model"), str(tmp_path / "back"))
  assert "pytorch_model.bin" in proc.stdout
  back = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)
  used = {k for k in state if not k.startswith("cls.") and "position_ids" not in k}
  assert set(back) == used
  for k in used:
    assert back[k].dtype == torch.float32
    assert torch.equal(back[k], state[k]), k
  # The exported folder is itself a valid source, and converts to the same params.
  _, p1, _ = load_model_dir(tmp_path / "model")
  convert.convert_to_model_dir(tmp_path / "back", tmp_path / "model2")
  _, p2, _ = load_model_dir(tmp_path / "model2")
  from vldeformer_jax.model_dir import flatten
  f1, f2 = flatten(p1), flatten(p2)
  assert f1.keys() == f2.keys()
  assert all(np.array_equal(f1[k], f2[k]) for k in f1)
  cfg = json.loads((tmp_path / "back" / "config.json").read_text())
  assert cfg["use_img_layernorm"] == 1 and cfg["img_feature_dim"] == 12


def test_gamma_beta_and_unprefixed_keys_are_accepted(tmp_path, vocab_file):
  src = tmp_path / "oscar"
  state = make_oscar_checkpoint(src, vocab_file, use_img_layernorm=False)
  renamed = {}
  for k, v in state.items():
    k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                  "LayerNorm.beta")
    renamed[k] = v
  torch.save(renamed, src / "pytorch_model.bin")
  convert.convert_to_model_dir(src, tmp_path / "a")
  # HF BertModel style: no `bert.` prefix (and no image parts: a text-only BERT).
  text_only = {k[len("bert."):]: v for k, v in state.items()
               if k.startswith("bert.") and "img_embedding" not in k}
  torch.save(text_only, src / "pytorch_model.bin")
  report = convert.convert_to_model_dir(src, tmp_path / "b")
  assert report.kind == "bert"
  assert "bert.img_embedding.weight" in report.initialised
  _, pa, _ = load_model_dir(tmp_path / "a")
  _, pb, _ = load_model_dir(tmp_path / "b")
  np.testing.assert_array_equal(
      pa["bert"]["encoder"]["layer"]["output"]["LayerNorm"]["scale"][1],
      pb["bert"]["encoder"]["layer"]["output"]["LayerNorm"]["scale"][1])


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path, vocab_file):
  src = tmp_path / "evil"
  make_oscar_checkpoint(src, vocab_file, use_img_layernorm=False)
  marker = tmp_path / "payload_ran"

  class Payload:
    def __reduce__(self):
      return (pathlib.Path.touch, (marker,))

  state = torch.load(src / "pytorch_model.bin", weights_only=True)
  state["bert.evil"] = Payload()
  torch.save(state, src / "pytorch_model.bin")
  assert not marker.exists()
  with pytest.raises(convert.CheckpointError, match=r"pytorch_model.bin: refused"):
    convert.from_pytorch(src)
  proc = run_bin("convert", str(src), str(tmp_path / "out"), check=False)
  assert proc.returncode == 1 and "refused" in proc.stderr
  assert not marker.exists(), "the pickle's payload ran"
  assert not (tmp_path / "out").exists()


def test_legacy_format_and_half_precision_checkpoints_load(tmp_path, vocab_file):
  """Old (pre-zip) torch.save files and fp16/bf16 tensors pass the pickle scan and
  load as float32; the scan only refuses code, not the tensor globals."""
  src = tmp_path / "oscar"
  state = make_oscar_checkpoint(src, vocab_file, use_img_layernorm=False)
  mixed = {k: (v.half() if i % 3 == 1 else v.bfloat16() if i % 3 == 2 else v)
           if v.is_floating_point() else v for i, (k, v) in enumerate(state.items())}
  torch.save(mixed, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
  loaded = convert.read_state_dict(src / "pytorch_model.bin")
  assert loaded.keys() == state.keys()
  for k, v in mixed.items():
    expected = v.float().numpy() if v.is_floating_point() else v.numpy()
    np.testing.assert_array_equal(loaded[k], expected, err_msg=k)


def test_wrong_shape_names_the_key(tmp_path, vocab_file):
  src = tmp_path / "oscar"
  state = make_oscar_checkpoint(src, vocab_file, use_img_layernorm=False)
  state["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(63, 32)
  torch.save(state, src / "pytorch_model.bin")
  with pytest.raises(convert.CheckpointError,
                     match=r"bert\.encoder\.layer\.1\.intermediate\.dense\.weight has "
                           r"shape \(63, 32\), expected \(64, 32\)"):
    convert.from_pytorch(src)


def test_missing_key_names_the_key(tmp_path, vocab_file):
  src = tmp_path / "oscar"
  state = make_oscar_checkpoint(src, vocab_file, use_img_layernorm=True)
  del state["bert.encoder.layer.0.attention.self.value.bias"]
  del state["bert.LayerNorm.weight"]
  torch.save(state, src / "pytorch_model.bin")
  proc = run_bin("convert", str(src), str(tmp_path / "out"), check=False)
  assert proc.returncode == 1
  assert "missing tensor bert.encoder.layer.0.attention.self.value.bias" in proc.stderr
  assert "missing tensor bert.LayerNorm.weight" in proc.stderr


def test_text_only_bert_lacking_encoder_tensor_is_an_error(tmp_path, minilm_src):
  from safetensors.numpy import load_file, save_file
  import shutil
  src = tmp_path / "minilm"
  shutil.copytree(minilm_src, src)
  state = load_file(str(src / "model.safetensors"))
  del state["encoder.layer.2.output.dense.weight"]
  save_file(state, str(src / "model.safetensors"))
  with pytest.raises(convert.CheckpointError,
                     match=r"missing tensor bert\.encoder\.layer\.2\.output\.dense\.weight"):
    convert.from_pytorch(src)


def test_minilm_conversion_report(minilm_src):
  config, params, vocab, report = convert.from_pytorch(minilm_src)
  assert config.hidden_size == 384 and config.num_hidden_layers == 6
  assert config.img_feature_dim == 2054 and not config.use_img_layernorm
  assert report.dropped == ["embeddings.position_ids"]
  assert sorted(report.initialised) == ["bert.img_embedding.bias",
                                        "bert.img_embedding.weight",
                                        "classifier.bias", "classifier.weight"]
  assert len(report.mapped) == 103


def test_model_dir_errors(tmp_path, minilm_dir):
  with pytest.raises(ModelDirError, match="not a model directory"):
    vld.load_pretrained(tmp_path)
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(minilm_dir, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["num_hidden_layers"] = 7
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelDirError,
                     match=r"parameter bert/encoder/layer/\S+ has shape \(6, .*expected \(7,"):
    load_model_dir(bad)
  cfg["num_hidden_layers"] = 6
  cfg["hidden_size"] = "large"
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config.json: field 'hidden_size' has value 'large'"):
    load_model_dir(bad)


def test_config_validation():
  with pytest.raises(ValueError, match="pooling must be one of"):
    ModelConfig(pooling="max")
  with pytest.raises(ValueError, match="not a multiple"):
    ModelConfig(hidden_size=30, num_attention_heads=4)
  assert ModelConfig.from_dict({"use_img_layernorm": 1}).use_img_layernorm is True


def test_bin_convert_bad_flag_and_source(tmp_path):
  proc = run_bin("convert", "--bogus", "a", "b", check=False)
  assert proc.returncode == 2 and "--bogus" in proc.stderr
  proc = run_bin("convert", str(tmp_path / "nope"), str(tmp_path / "out"), check=False)
  assert proc.returncode == 1 and "nope: not a directory" in proc.stderr


def test_model_dir_with_per_layer_keys_still_loads(tmp_path, minilm_dir):
  """Model directories written before the layers were scanned hold `layer_N` keys."""
  from safetensors.numpy import load_file, save_file
  old = tmp_path / "old"
  import shutil
  shutil.copytree(minilm_dir, old)
  flat = load_file(str(old / "params.safetensors"))
  per_layer = {}
  for key, value in flat.items():
    if key.startswith("bert/encoder/layer/"):
      for i, row in enumerate(value):
        per_layer[key.replace("/layer/", f"/layer_{i}/")] = np.ascontiguousarray(row)
    else:
      per_layer[key] = value
  save_file(per_layer, str(old / "params.safetensors"))
  _, new_params, _ = load_model_dir(minilm_dir)
  _, old_params, _ = load_model_dir(old)
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(old_params)):
    np.testing.assert_array_equal(a, b)
  del per_layer["bert/encoder/layer_2/output/dense/bias"]
  save_file(per_layer, str(old / "params.safetensors"))
  with pytest.raises(ModelDirError, match=r"layer_N/output/dense/bias: layers \[2\] missing"):
    load_model_dir(old)


def test_a_loaded_models_params_save_and_export_as_stored(tmp_path, minilm_dir):
  """`VLDeformer.params` (one tree per layer, what inference reads) saves back to a
  model directory and exports to PyTorch keys exactly as the stored, stacked ones."""
  from safetensors.numpy import load_file
  from vldeformer_jax.model_dir import save_model_dir
  model = vld.load_pretrained(minilm_dir)
  assert "layer_0" in model.params["bert"]["encoder"]
  save_model_dir(tmp_path / "again", model.config, model.params, model.vocab_file)
  stored = load_file(str(minilm_dir / "params.safetensors"))
  again = load_file(str(tmp_path / "again" / "params.safetensors"))
  assert again.keys() == stored.keys()
  for key in stored:
    np.testing.assert_array_equal(again[key], stored[key], err_msg=key)
  assert json.loads((tmp_path / "again" / "config.json").read_text())["scan_layers"] is True
  _, stacked, _ = load_model_dir(minilm_dir)
  ours = convert.to_state_dict(model.params, model.config)
  ref = convert.to_state_dict(stacked, model.config)
  assert ours.keys() == ref.keys()
  for key in ref:
    np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
