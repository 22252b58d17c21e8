"""The PyTorch reference that the speed study and the benchmarks time ours against.

One builder, `oscar_encoder`, makes the network both sides compare: a transformers
`BertModel` plus, for images, Oscar's region embedding (Linear, optional LayerNorm,
dropout), encoding like VLDeformer's individual encoder (tanh of the masked mean).
It starts from our parameters (`convert.to_state_dict`) or from PyTorch's own seeded
initialisation (`to_our_params` then gives ours the same weights). `TorchQueryPath` is
the speed study's single-query path on it.

torch and transformers are imported at the top: only their users import this module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import transformers
from torch import nn

from vldeformer_jax import convert
from vldeformer_jax.config import ModelConfig

# Our module's state-dict prefixes -> Oscar's (`convert`'s) key prefixes, most specific
# Oscar prefix first (`bert.LayerNorm.` is the image LayerNorm, not a BertModel one).
_OSCAR_PREFIXES = (("img_embedding.", "bert.img_embedding."),
                   ("img_layernorm.", "bert.LayerNorm."), ("bert.", "bert."))


def _to_oscar(key: str) -> str | None:
  for ours, oscar in _OSCAR_PREFIXES:
    if key.startswith(ours):
      return oscar + key[len(ours):]
  return None


def _from_oscar(key: str) -> str | None:
  for ours, oscar in _OSCAR_PREFIXES:
    if key.startswith(oscar):
      return ours + key[len(oscar):]
  return None


def bert_config(config: ModelConfig, training: bool = False,
                attn_implementation: str | None = None) -> transformers.BertConfig:
  """transformers' config for our architecture; dropout as `config` says when
  `training`, else none. `attn_implementation` None: transformers' default."""
  hf = transformers.BertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_hidden_layers,
      num_attention_heads=config.num_attention_heads,
      intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
      max_position_embeddings=config.max_position_embeddings,
      type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
      hidden_dropout_prob=config.hidden_dropout_prob if training else 0.0,
      attention_probs_dropout_prob=(config.attention_probs_dropout_prob if training
                                    else 0.0))
  if attn_implementation is not None:
    hf._attn_implementation = attn_implementation
  return hf


class OscarEncoder(nn.Module):
  """`BertModel` + (with `regions`) Oscar's region embedding, used as VLDeformer's
  individual encoder: `encode` embeds the tokens with `BertModel.embeddings` and the
  regions with the Linear (+ LayerNorm when `config.use_img_layernorm`), concatenates
  them and runs `BertModel.encoder` with the additive mask (1 - m) * -10000, then
  tanh of the masked mean. `pooler`: keep BertModel's pooler (unused by `encode`; for
  'cls' pooling, or so that the state dict converts to our full parameter tree)."""

  def __init__(self, config: ModelConfig, regions: bool = True, pooler: bool = True,
               training: bool = False, attn_implementation: str | None = None):
    super().__init__()
    hf = bert_config(config, training, attn_implementation)
    self.bert = transformers.BertModel(hf, add_pooling_layer=pooler)
    self.img_embedding = self.img_layernorm = self.img_dropout = None
    if regions:
      self.img_embedding = nn.Linear(config.img_feature_dim, hf.hidden_size)
      if config.use_img_layernorm:
        self.img_layernorm = nn.LayerNorm(hf.hidden_size, eps=config.img_layer_norm_eps)
      self.img_dropout = nn.Dropout(hf.hidden_dropout_prob)

  def encode(self, input_ids, token_type_ids, position_ids, token_mask, regions=None,
             region_mask=None):
    x = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                             position_ids=position_ids)
    mask = token_mask
    if regions is not None:
      r = self.img_embedding(regions)
      if self.img_layernorm is not None:
        r = self.img_layernorm(r)
      x = torch.cat([x, self.img_dropout(r)], dim=1)
      mask = torch.cat([token_mask, region_mask], dim=1)
    m = mask.to(x.dtype)
    bias = ((1.0 - m) * -10000.0)[:, None, None, :]
    seq = self.bert.encoder(x, attention_mask=bias).last_hidden_state
    m = m.unsqueeze(-1)
    return torch.tanh((seq * m).sum(1) / m.sum(1).clamp(min=1.0))

  def load_params(self, params: Any, config: ModelConfig) -> "OscarEncoder":
    """Copies in our parameters (those this module holds; it must hold no others)."""
    wanted = self.state_dict()
    state = {}
    for key, value in convert.to_state_dict(params, config).items():
      key = _from_oscar(key)
      if key in wanted:
        state[key] = torch.from_numpy(np.array(value, np.float32))
    missing = [k for k in wanted if k not in state and not k.endswith("position_ids")]
    if missing:
      raise ValueError(f"our parameters lack BertModel tensors: {missing}")
    self.load_state_dict(state, strict=False)
    return self

  def to_our_params(self, config: ModelConfig) -> Any:
    """Our parameter tree from this module's weights (through Oscar's key names)."""
    state = {_to_oscar(k): v.detach().numpy() for k, v in self.state_dict().items()}
    params, _ = convert.from_state_dict(state, config, "PyTorch reference")
    return params


def oscar_encoder(config: ModelConfig, params: Any = None, regions: bool = True,
                  pooler: bool = True, training: bool = False, seed: int = 0,
                  attn_implementation: str | None = None) -> OscarEncoder:
  """An `OscarEncoder` for `config`, with our `params` or (None) PyTorch's
  initialisation after `torch.manual_seed(seed)`; in train mode when `training`
  (dropout as `config` says), else in eval mode."""
  torch.manual_seed(seed)
  model = OscarEncoder(config, regions, pooler, training, attn_implementation)
  if params is not None:
    model.load_params(params, config)
  return model.train(training)


def torch_bert(config: ModelConfig, params: Any) -> transformers.BertModel:
  """A transformers `BertModel` holding our parameters, in eval mode, with a pooler
  only for 'cls' pooling (the text side of `oscar_encoder`)."""
  return oscar_encoder(config, params, regions=False,
                       pooler=config.pooling == "cls").bert


def torch_tokenizer(vocab_file: str | os.PathLike, lowercase: bool):
  """transformers' WordPiece tokenizer for a vocab.txt (read from a folder of its own:
  `from_pretrained` of a model directory would read our config.json)."""
  with tempfile.TemporaryDirectory(prefix="vocab_") as tmp:
    shutil.copyfile(vocab_file, Path(tmp) / "vocab.txt")
    return transformers.BertTokenizerFast.from_pretrained(tmp, do_lower_case=lowercase)


class TorchQueryPath:
  """The reference: transformers tokenizer + `BertModel` + the same pooling (tanh of
  the masked mean, or the pooler for 'cls') + L2 norm + torch matmul + `torch.topk`,
  on the same weights; the gallery tensor shares the caller's NumPy memory on CPU."""

  name = "PyTorch"

  def __init__(self, config: ModelConfig, params: Any, vocab_file: str | os.PathLike,
               gallery: np.ndarray, k: int = 10, device: str | None = None,
               bert: Any = None, tokenizer: Any = None):
    self.torch = torch
    self.config = config
    self.k = min(k, len(gallery))
    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    self.tokenizer = tokenizer or torch_tokenizer(vocab_file, config.do_lower_case)
    self.bert = (bert or torch_bert(config, params)).to(self.device)
    self.gallery = torch.from_numpy(np.ascontiguousarray(gallery, np.float32)).to(
        self.device)
    self.resident_bytes = int(self.gallery.nbytes) + int(
        sum(p.nbytes for p in self.bert.parameters()))

  def encode_text(self, captions: Sequence[str]) -> Any:
    """[n, hidden] r_t as a torch tensor (not normalised)."""
    cfg = self.config
    fixed = cfg.pooling == "mean_unmasked"
    enc = self.tokenizer(list(captions), truncation=True, max_length=cfg.max_text_len,
                         padding="max_length" if fixed else True, return_tensors="pt")
    enc = {k: v.to(self.device) for k, v in enc.items()}
    out = self.bert(**enc)
    if cfg.pooling == "cls":
      return out.pooler_output
    seq = out.last_hidden_state
    if fixed:
      return torch.tanh(seq.mean(1))
    m = enc["attention_mask"].unsqueeze(-1).to(seq.dtype)
    return torch.tanh((seq * m).sum(1) / m.sum(1).clamp(min=1.0))

  def __call__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
      q = torch.nn.functional.normalize(self.encode_text([caption]), dim=-1)[0]
      scores, ids = torch.topk(self.gallery @ q, self.k)
      return scores.cpu().numpy(), ids.cpu().numpy().astype(np.int64)
