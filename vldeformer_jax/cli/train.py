"""Contrastive decomposing of a pre-trained VL transformer (VLDeformer).

  bin/train --config configs/demo.py --workdir workdirs/demo [--config.KEY=VALUE ...]
  bin/train --config configs/vinvl_coco.py:no_negatives,seed=1 --workdir W

Resumes automatically from the checkpoints in --workdir. SIGTERM/SIGINT finish the
current step, save and exit 0. Compiled steps are kept on disk
(~/.cache/vldeformer_jax/xla, JAX's persistent compilation cache), so a rerun or a
resume loads them: JAX_COMPILATION_CACHE_DIR moves it, JAX_ENABLE_COMPILATION_CACHE=false
turns it off. Multi-host: pass --coordinator_address, --num_processes
and --process_id (or set them in the environment jax.distributed reads).
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from vldeformer_jax import cli


def _flags(argv: list[str]) -> tuple[flags.FlagValues, dict[str, flags.FlagHolder]]:
  """This tool's flags in a registry of their own, so `main` can run more than once in
  one process (tests)."""
  fv = flags.FlagValues()
  held = dict(
      config=config_flags.DEFINE_config_file(
          "config", None, "a configs/*.py file[:arg]", flag_values=fv, lock_config=True,
          sys_argv=argv),
      workdir=flags.DEFINE_string("workdir", None,
                                  "checkpoints, metrics and model/ go here", flag_values=fv),
      coordinator=flags.DEFINE_string("coordinator_address", None,
                                      "host:port of process 0, for multi-host training",
                                      flag_values=fv),
      num_processes=flags.DEFINE_integer("num_processes", None, "number of processes",
                                         flag_values=fv),
      process_id=flags.DEFINE_integer("process_id", None, "this process's index",
                                      flag_values=fv),
      cpu_devices=flags.DEFINE_integer("num_cpu_devices", None,
                                       "simulate N CPU devices (testing multi-device code)",
                                       flag_values=fv))
  return fv, held


def main(argv: Sequence[str] | None = None) -> int:
  """bin/train: parses the flags (argv without the program name; default sys.argv)
  and runs `train.train_and_evaluate`. Returns the exit status."""
  argv = ["bin/train", *(sys.argv[1:] if argv is None else argv)]
  if (error := cli.config_file_error(argv[1:]) or cli.config_override_error(argv[1:])):
    print(f"bin/train: error: {error}", file=sys.stderr)
    return 2
  fv, held = _flags(argv)
  if {"-h", "--help", "--helpfull"} & set(argv):
    print(f"{__doc__}\nflags:\n{fv.get_help()}")
    return 0
  try:
    extra = fv(argv)
    for name in ("config", "workdir"):
      if fv[name].value is None:
        raise flags.Error(f"flag --{name} must be given")
  except flags.Error as e:
    print(f"bin/train: error: {e} (bin/train --help)", file=sys.stderr)
    return 2
  if len(extra) > 1:
    print(f"bin/train: error: unexpected arguments: {extra[1:]}", file=sys.stderr)
    return 2
  import jax
  if held["cpu_devices"].value:
    jax.config.update("jax_num_cpu_devices", held["cpu_devices"].value)
  if held["coordinator"].value or held["num_processes"].value:
    jax.distributed.initialize(coordinator_address=held["coordinator"].value,
                               num_processes=held["num_processes"].value,
                               process_id=held["process_id"].value)
  from absl import logging as absl_logging
  from vldeformer_jax import train
  cli.enable_compilation_cache()
  # Our progress at INFO; orbax/absl chatter only from WARNING up.
  flags.FLAGS.mark_as_parsed()  # absl's logging reads its flags; ours are apart
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logging.use_absl_handler()
  logging.getLogger("vldeformer_jax").setLevel(logging.INFO)

  def body() -> None:
    train.train_and_evaluate(held["config"].value, held["workdir"].value)

  return cli.run("train", body, batch_flag="--config.batch_size")
