"""Nothing lost, no traceback (issue 23): every bin/ tool, given a path or input it
cannot use, says so in one line `bin/TOOL: error: ...` naming the path or flag, exits
non-zero, and leaves what is there untouched; each output path is checked before the
work starts. The tools run in-process (`cli.<tool>.main(argv)`)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, TINY_FEATURE_DIM

DEMO_CONFIG = str(REPO / "configs" / "demo.py")


@pytest.fixture(autouse=True)
def logging_as_it_was():
  """The tools set up logging for a process of their own (bin/train adds absl's
  handler, levels); the tests after these find it as it was."""
  import logging
  root, ours = logging.getLogger(), logging.getLogger("vldeformer_jax")
  handlers, levels = list(root.handlers), (root.level, ours.level)
  yield
  root.handlers[:] = handlers
  root.setLevel(levels[0])
  ours.setLevel(levels[1])


def run_tool(tool: str, argv: list[str], capsys) -> tuple[int, str]:
  """(exit status, stderr) of `bin/TOOL argv`, run in this process."""
  capsys.readouterr()
  try:
    rc = importlib.import_module(f"vldeformer_jax.cli.{tool}").main(argv)
  except SystemExit as e:  # argparse's own errors
    rc = e.code
  return rc, capsys.readouterr().err


def assert_one_line(tool: str, err: str, fragment: str) -> None:
  assert "Traceback" not in err, err
  errors = [line for line in err.splitlines() if ": error: " in line]
  assert len(errors) == 1, err
  assert errors[0].startswith(f"bin/{tool}: error: "), err
  assert fragment in errors[0], err


def snapshot(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A small demo dataset (16-d regions, as the tiny model) and broken copies of it:
  a test split with no images, test captions that are not JSON, a .pt that is not a
  torch file."""
  from vldeformer_jax.data.synthetic import write_demo_dataset
  root = tmp_path_factory.mktemp("bad_input_data")
  good = write_demo_dataset(root / "good", num_train_images=8, num_test_images=4,
                            feature_dim=TINY_FEATURE_DIM).out_dir
  variants = {}
  for name in ("empty", "bad_json", "bad_pt"):
    variants[name] = shutil.copytree(good, root / name)
  (variants["empty"] / "test_img_keys.tsv").write_text("")
  (variants["bad_json"] / "test_captions.json").write_text("{oops")
  (variants["bad_pt"] / "test_captions.json").unlink()
  (variants["bad_pt"] / "test_captions.pt").write_bytes(b"not a torch file")
  return SimpleNamespace(good=good, **variants)


@pytest.fixture
def things(tmp_path):
  """What a user has, which no tool may replace: a directory of notes, a text file, a
  matplotlib PNG and a JSON file, none of them ours."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  user = tmp_path / "user"
  (user / "notes").mkdir(parents=True)
  (user / "notes" / "notes.txt").write_text("keep me")
  (user / "file.txt").write_text("keep me too")
  fig = plt.figure()
  fig.savefig(user / "plot.png")
  plt.close(fig)
  (user / "results.json").write_text(json.dumps({"r1": 1.0}))
  return SimpleNamespace(root=user, dir=user / "notes", file=user / "file.txt",
                         png=user / "plot.png", json=user / "results.json",
                         under_file=user / "file.txt" / "out")


def train_argv(workdir, data_dir, model, *extra) -> list[str]:
  """bin/train's flags for the tiny model on the small data."""
  return ["--config", DEMO_CONFIG, "--workdir", str(workdir),
          f"--config.data_dir={data_dir}", f"--config.init_model={model}",
          f"--config.feature_dim={TINY_FEATURE_DIM}", "--config.max_text_len=24",
          "--config.max_tag_len=12", "--config.max_regions=8",
          "--config.prepare_workers=0", "--config.pipeline_workers=1", *extra]


# (tool, argv from (things t, data d, model m), fragment of the one-line error). Each
# output path is refused before the work: the inputs given would fail later, or take
# long, if it were not.
OUTPUT_CASES = [
    ("convert", lambda t, d, m: [m, t.dir],
     "exists and is not a model directory (bin/convert, bin/train); pass --overwrite"),
    ("convert", lambda t, d, m: [m, t.file], "is a file; expected a model directory"),
    ("convert", lambda t, d, m: [m, t.under_file],
     "file.txt is a file, not a directory"),
    ("convert", lambda t, d, m: ["--to-pytorch", m, t.dir],
     "exists and is not a PyTorch export"),
    ("eval", lambda t, d, m: ["--model", d, "--data_dir", d, "--output", t.json],
     "--output {json}: exists and is not a bin/eval --output file; pass --overwrite"),
    ("eval", lambda t, d, m: ["--model", d, "--data_dir", d, "--output", t.dir],
     "--output {dir}: is a directory; expected a bin/eval --output file"),
    ("eval", lambda t, d, m: ["--model", d, "--data_dir", d, "--output",
                              t.under_file], "file.txt is a file, not a directory"),
    ("index", lambda t, d, m: ["--model", m, "--data_dir", d, "--split", "test", "--out",
                               t.dir], "--out {dir}: exists and is not an index"),
    ("index", lambda t, d, m: ["--model", m, "--data_dir", d, "--split", "test", "--out",
                               t.file], "is a file; expected an index"),
    ("index", lambda t, d, m: ["--model", m, "--data_dir", d, "--split", "test", "--out",
                               t.under_file], "file.txt is a file, not a directory"),
    ("build_data", lambda t, d, m: ["--data_dir", d, "--out", t.dir],
     "--out {dir}: not empty and not a bin/build_data output; it is never replaced"),
    ("build_data", lambda t, d, m: ["--data_dir", d, "--out", t.file],
     "is a file; expected a bin/build_data output"),
    ("plot", lambda t, d, m: ["nope", "--out", t.png],
     "--out {png}: exists and is not a bin/plot --out file; pass --overwrite"),
    ("plot", lambda t, d, m: ["--recall", f"a={t.json}", "--recall_out", t.dir],
     "--recall_out {dir}: is a directory"),
    ("report", lambda t, d, m: ["--model", m, "--data_dir", d, "--out", t.file],
     "--out {file}: exists and is not a bin/report page; pass --overwrite"),
    ("bench", lambda t, d, m: ["--random", "micro", "--output", t.json],
     "--output {json}: exists and is not a bin/bench --output file"),
    ("bench", lambda t, d, m: ["--random", "micro", "--plot", t.under_file],
     "file.txt is a file, not a directory"),
    ("train", lambda t, d, m: train_argv(t.dir, d, m),
     "--workdir {dir}: not empty and not a bin/train workdir; it is never replaced"),
    ("train", lambda t, d, m: train_argv(t.file, d, m),
     "is a file; expected a bin/train workdir"),
    ("train", lambda t, d, m: train_argv(t.under_file, d, m),
     "file.txt is a file, not a directory"),
]


@pytest.mark.parametrize("tool,argv,fragment", OUTPUT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(OUTPUT_CASES)])
def test_an_output_that_is_not_the_tools_own_is_refused_untouched(
    tool, argv, fragment, things, data, tiny_model_dir, capsys):
  before = snapshot(things.root)
  rc, err = run_tool(tool, [str(a) for a in argv(things, data.good, tiny_model_dir)],
                     capsys)
  assert rc == 1
  assert_one_line(tool, err, fragment.format(**vars(things)))
  assert snapshot(things.root) == before


def test_overwrite_replaces_and_own_outputs_are_replaced_on_rerun(
    things, tmp_path, capsys):
  """A re-run replaces the tool's own earlier output; --overwrite replaces another's."""
  from vldeformer_jax import fileio
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1}) + "\n"
              for s in (1, 2)))
  out = tmp_path / "curves.png"
  for _ in range(2):  # the second run finds its own curves.png
    rc, err = run_tool("plot", [str(workdir), "--out", str(out)], capsys)
    assert rc == 0, err
    assert fileio.is_generated(out)
  rc, err = run_tool("plot", [str(workdir), "--out", str(things.png), "--overwrite"],
                     capsys)
  assert rc == 0, err
  assert fileio.is_generated(things.png)


@pytest.mark.parametrize("name", ["nosuch.py", "syntax.py", "no_get.py", "raises.py",
                                  "a_dir"])
def test_a_missing_or_broken_config_file_is_one_line(name, tmp_path, capsys):
  files = {"syntax.py": "def get_config(:\n", "no_get.py": "x = 1\n",
           "raises.py": "def get_config():\n  raise RuntimeError('boom')\n"}
  fragments = {"nosuch.py": "no such file", "syntax.py": "line 1: invalid syntax",
               "no_get.py": "defines no get_config()",
               "raises.py": "RuntimeError: boom (line 2)", "a_dir": "not a file"}
  path = tmp_path / name
  if name in files:
    path.write_text(files[name])
  if name == "a_dir":
    path.mkdir()
  rc, err = run_tool("train", ["--config", str(path), "--workdir", str(tmp_path / "w")],
                     capsys)
  assert rc == 2
  assert_one_line("train", err, f"--config {path}: {fragments[name]}")
  assert not (tmp_path / "w").exists()


# A split with no images and a captions file in an unreadable format, for each tool
# that reads a split.
SPLIT_CASES = {
    "empty": "test_img_keys.tsv: split 'test' has no images [empty_split]",
    "bad_json": "test_captions.json, line 1: broken JSON",
    "bad_pt": "test_captions.pt: not a weights-only loadable torch file",
}
SPLIT_TOOLS = {
    "eval": lambda d, m, tmp: ["--model", m, "--data_dir", d, "--split", "test"],
    "index": lambda d, m, tmp: ["--model", m, "--data_dir", d, "--split", "test",
                                "--out", tmp / "index"],
    "report": lambda d, m, tmp: ["--model", m, "--data_dir", d, "--split", "test",
                                 "--out", tmp / "report.html"],
    "build_data": lambda d, m, tmp: ["--data_dir", d, "--out", tmp / "prepared",
                                     "--splits", "test", "--workers", "0",
                                     "--feature_dim", str(TINY_FEATURE_DIM)],
    "train": lambda d, m, tmp: train_argv(tmp / "workdir", d, m),  # its eval split
}


@pytest.mark.parametrize("tool", sorted(SPLIT_TOOLS))
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_an_unusable_split_is_one_line(tool, case, data, tiny_model_dir, tmp_path,
                                       capsys):
  data_dir = getattr(data, case)
  fragment = SPLIT_CASES[case]
  if tool == "build_data" and case == "empty":
    fragment = f"{data_dir}: split 'test' has no images [empty_split]"
  before = snapshot(data_dir)
  argv = [str(a) for a in SPLIT_TOOLS[tool](data_dir, tiny_model_dir, tmp_path)]
  rc, err = run_tool(tool, argv, capsys)
  assert rc == 1
  assert_one_line(tool, err, fragment)
  for name, content in before.items():  # the data itself is left as it was
    assert (data_dir / name).read_bytes() == content
  assert not (tmp_path / "index").exists() and not (tmp_path / "report.html").exists()


def test_a_broken_model_config_is_one_line(tiny_model_dir, data, tmp_path, capsys):
  model = shutil.copytree(tiny_model_dir, tmp_path / "model")
  (model / "config.json").write_text("{oops")
  rc, err = run_tool("eval", ["--model", str(model), "--data_dir", str(data.good)],
                     capsys)
  assert rc == 1
  assert_one_line("eval", err, f"{model / 'config.json'}: not valid JSON")


# What a small fuzz over the tools' flags found: each had a traceback, or failed only
# after the work.
FUZZ_CASES = [
    ("report", lambda t, d, m: ["--model", m, "--data_dir", d, "--out",
                                t.root / "r.html", "--queries_file", t.png], 2,
     "--queries_file {png}: 'utf-8' codec can't decode"),
    ("eval", lambda t, d, m: ["--model", m, "--data_dir", d, "--protocol", "coco1k"], 1,
     "protocol coco1k averages over folds of 1000 images, the split has 4"),
    ("train", lambda t, d, m: train_argv(t.root / "w", d, m,
                                         "--config.eval_protocol=coco1k"), 1,
     "--config.eval_protocol=coco1k: protocol coco1k averages over folds of 1000"),
    ("eval", lambda t, d, m: ["--model", t.root / "nope", "--data_dir", d], 1,
     "--model {root}/nope: no such directory"),
]


@pytest.mark.parametrize("tool,argv,rc,fragment", FUZZ_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(FUZZ_CASES)])
def test_what_the_fuzz_found_is_one_line(tool, argv, rc, fragment, things, data,
                                         tiny_model_dir, capsys):
  before = snapshot(things.root)
  got, err = run_tool(tool, [str(a) for a in argv(things, data.good, tiny_model_dir)],
                      capsys)
  assert got == rc
  assert_one_line(tool, err, fragment.format(**vars(things)))
  assert all(snapshot(things.root).get(k) == v for k, v in before.items())


def test_a_batch_that_cannot_fit_in_memory_is_refused_first(data, tiny_model_dir,
                                                            tmp_path, capsys,
                                                            monkeypatch):
  from vldeformer_jax import startup
  # A machine of 64 KiB: the tiny model's batches of 32 rows (54 KiB; 3 in flight)
  # need more.
  monkeypatch.setattr(startup, "host_memory_bytes", lambda: 2**16)
  workdir = tmp_path / "workdir"
  rc, err = run_tool("train", train_argv(workdir, data.good, tiny_model_dir,
                                         "--config.total_steps=1"), capsys)
  assert rc == 1
  assert_one_line("train", err, "--config.batch_size=32 does not fit in memory: 3 "
                  "batches in flight")
  assert "x 54.0 KiB each" in err and "need 162.0 KiB, this machine has 64.0 KiB" in err
  assert "lower --config.batch_size" in err
  assert not workdir.exists()  # refused before anything was built


def test_resuming_with_another_model_size_is_one_line(data, tiny_model_dir, tmp_path,
                                                      capsys, vocab_file):
  """The fast twin of test_bin_e2e's real resume: the workdir's model directory (saved
  with every checkpoint) says which architecture its checkpoints hold."""
  from vldeformer_jax.model_dir import random_model_dir
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("")
  random_model_dir("micro", workdir / "model", vocab_file=vocab_file, hidden_size=64,
                   img_feature_dim=TINY_FEATURE_DIM, max_regions=8, max_text_len=24,
                   max_tag_len=12)
  before = snapshot(workdir)
  rc, err = run_tool("train", train_argv(workdir, data.good, tiny_model_dir), capsys)
  assert rc == 1
  assert_one_line("train", err, f"--workdir {workdir}: its checkpoints hold another "
                  "model (hidden_size=64) than this run's --config.init_model="
                  f"{tiny_model_dir} (hidden_size=32)")
  assert snapshot(workdir) == before


def test_the_demo_refuses_a_foreign_directory_and_keeps_its_own(things, tmp_path,
                                                                capsys):
  from vldeformer_jax.cli import demo
  before = snapshot(things.root)
  assert demo.main([str(things.dir)]) == 1
  err = capsys.readouterr().err
  assert err.splitlines() == [
      f"scripts/demo.sh: error: VLD_DEMO_DIR {things.dir}: not empty and not a "
      "scripts/demo.sh output; it is never replaced: give VLD_DEMO_DIR a new or empty "
      "directory"]
  assert snapshot(things.root) == before
  out = tmp_path / "demo_output"
  assert demo.main([str(out)]) == 0 and (out / demo.MARKER).is_file()
  (out / "notes_the_demo_never_writes.txt").write_text("")
  assert demo.main([str(out)]) == 0  # marked as the demo's: a re-run goes on
  legacy = tmp_path / "legacy"  # a demo directory from before the marker
  (legacy / "workdir").mkdir(parents=True)
  (legacy / "eval_before.json").write_text("{}")
  assert demo.main([str(legacy)]) == 0


def test_demo_sh_claims_its_directory_before_anything_else():
  """Before the set-up and every tool: a foreign $VLD_DEMO_DIR costs nothing."""
  lines = [line for line in (REPO / "scripts" / "demo.sh").read_text().splitlines()
           if not line.lstrip().startswith("#")]
  claim = lines.index('PYTHONPATH="$repo" python3 -m vldeformer_jax.cli.demo "$out"')
  later = [i for i, line in enumerate(lines)
           if "setup.sh" in line or "bin/" in line or "synthetic" in line]
  assert later and claim < min(later)


def test_the_demos_claim_runs_on_pythons_standard_library_alone(things):
  """demo.sh claims its directory before the set-up made the virtual environment: the
  check imports nothing beyond the standard library (`python -S`: no site-packages)."""
  import os
  import subprocess
  import sys
  before = snapshot(things.root)
  proc = subprocess.run([sys.executable, "-S", "-m", "vldeformer_jax.cli.demo",
                         str(things.dir)], capture_output=True, text=True, cwd=REPO,
                        env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
                        timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.startswith(f"scripts/demo.sh: error: VLD_DEMO_DIR {things.dir}: "
                                "not empty and not a scripts/demo.sh output")
  assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
  assert snapshot(things.root) == before


def test_the_demo_data_writer_keeps_to_its_own_directory(things, tmp_path, capsys):
  from vldeformer_jax.data import synthetic
  before = snapshot(things.root)
  with pytest.raises(SystemExit) as exit_:
    synthetic.main([str(things.dir), "--num_train", "4", "--num_test", "3", "--no_pt"])
  assert exit_.value.code == 1
  assert capsys.readouterr().err == (
      f"python -m vldeformer_jax.data.synthetic: error: OUT_DIR {things.dir}: exists and "
      "is not a demo dataset; pass --overwrite to replace it\n")
  assert snapshot(things.root) == before
  small = ["--num_train", "4", "--num_test", "3", "--no_pt"]
  for _ in range(2):  # the second run finds its own dataset
    assert synthetic.main([str(tmp_path / "demo"), *small]) == 0
  assert synthetic.main([str(things.dir), *small, "--overwrite"]) == 0
  assert (things.dir / "features.tsv").is_file()
