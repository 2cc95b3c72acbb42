"""``python -m ddx info [--config=configs/cifar10.py]``: every process prints the devices it
drives (run it under a launcher to check a multi-host setup); with --config, process 0 also
prints the parameter count and the mesh."""

from __future__ import annotations

import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from ddx import parallel
from ddx.cli import config as config_lib
from ddx.cli.commands import common
from ddx.models import abstract, param_count

HELP = "print the devices of every process [and parameter count, mesh for --config]"
FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
  "config", None, "An ml_collections config file (configs/*.py); optional.", flag_values=FLAGS, lock_config=True
)
common.define_distributed(FLAGS)


def main(argv: list[str]) -> int:
  del argv
  common.check_distributed(FLAGS)
  cfg = None
  if FLAGS.config is not None:
    cfg = config_lib.validate(FLAGS.config)
  common.init_distributed(FLAGS)

  # one write() per line: every process shares the launcher's stdout, and a pipe keeps a
  # write of under 4 KiB whole, so lines of different processes never interleave
  sys.stdout.flush()
  os.write(sys.stdout.fileno(), (parallel.format_device_report(parallel.device_report()) + "\n").encode())
  if cfg is None or jax.process_index() != 0:
    return 0
  mesh = parallel.data_mesh()
  n = param_count(abstract(config_lib.model_config(cfg)))
  b = cfg["train"]["global_batch_size"]
  print(f"model:   UNet, {n:,} parameters ({n * 4 / 2**20:.1f} MiB float32)")
  print(
    f"data:    {cfg['data']['name']} at {cfg['model']['image_size']}x{cfg['model']['image_size']}x"
    f"{cfg['model']['in_channels']}"
  )
  print(
    f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} processes, "
    f"backend {jax.default_backend()})"
  )
  print(f"mesh:    {dict(mesh.shape)}; global batch {b} -> {b / jax.device_count():g} per device")
  return 0
