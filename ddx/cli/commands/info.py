"""``python -m ddx info [--config=configs/cifar10.py [--config.parallel.fsdp=8]] [--fake_devices=N]``.

Every process prints the devices it drives (run it under a launcher to check a multi-host
setup). With --config (a diffusion config), process 0 also prints the model, the mesh and
what ``ddx train`` would report at its start: the per-device bytes of parameters, EMA and
optimizer state under the config's shardings, and the compiled step's memory and FLOPs, from
an ahead-of-time compile for abstract inputs (nothing is allocated, nothing trains).
``--fake_devices=N`` plans for N CPU devices instead of the devices at hand (a pod's mesh on a
laptop: the shardings and per-device figures are those of N devices; the FLOPs and memory are
XLA:CPU's compile of the same program).
"""

from __future__ import annotations

import io
import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from ddx import parallel, schedules
from ddx.cli import config as config_lib
from ddx.cli import limits
from ddx.cli.commands import common
from ddx.models import UNet, abstract, param_count
from ddx.training import loop, report

HELP = "print the devices of every process [and the model, mesh, per-device memory and FLOPs for --config]"
FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
  "config", None, "An ml_collections config file (configs/*.py); optional.", flag_values=FLAGS, lock_config=True
)
flags.DEFINE_integer(
  "fake_devices", None, "Plan for this many CPU devices instead of the devices at hand.", flag_values=FLAGS
)
common.define_distributed(FLAGS)


def main(argv: list[str]) -> int:
  del argv
  common.check_distributed(FLAGS)
  fake = common.check_int(FLAGS, "fake_devices", lo=1, hi=limits.MAX_DEVICES)
  cfg = None
  if FLAGS.config is not None:
    cfg = config_lib.validate(FLAGS.config)
  if fake is not None:
    if FLAGS.coordinator is not None or FLAGS.num_processes is not None:
      raise ValueError("--fake_devices: plans on this process's CPU; drop --coordinator / --num_processes")
    # before the first JAX call creates the backends
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={fake}"
    jax.config.update("jax_platforms", "cpu")
  common.init_distributed(FLAGS)

  # one write() per line: every process shares the launcher's stdout, and a pipe keeps a
  # write of under 4 KiB whole, so lines of different processes never interleave
  line = parallel.format_device_report(parallel.device_report()) + "\n"
  try:
    fd = sys.stdout.fileno()
  except (AttributeError, OSError, io.UnsupportedOperation):  # a captured stdout (tests, notebooks)
    sys.stdout.write(line)
  else:
    sys.stdout.flush()
    os.write(fd, line.encode())
  if cfg is None:
    return 0
  if fake is not None and jax.device_count() != fake:
    raise ValueError(f"--fake_devices: asked for {fake} CPU devices, JAX has {jax.device_count()} (set before JAX?)")
  mesh = parallel.make_mesh(cfg["parallel"]["fsdp"])
  if jax.process_index() != 0:
    return 0
  m = config_lib.model_config(cfg)
  n = param_count(abstract(m))
  b = cfg["train"]["global_batch_size"]
  kind = jax.devices()[0].device_kind
  print(f"model:   UNet, {n:,} parameters ({n * 4 / 2**20:.1f} MiB float32)")
  print(f"data:    {cfg['data']['name']} at {m.image_size}x{m.image_size}x{m.in_channels}")
  print(f"devices: {jax.device_count()} x {kind} ({jax.process_count()} processes, backend {jax.default_backend()})")
  print(f"mesh:    {dict(mesh.shape)}; global batch {b} -> {b / jax.device_count():g} per device")
  if cfg["kind"] != "diffusion":
    print("plan:    (the memory and FLOPs report covers diffusion configs)")
    return 0
  spec = config_lib.loop_spec(cfg)
  sb, cs = loop.plan(
    lambda rngs: UNet(m, rngs=rngs),
    image_shape=(m.image_size, m.image_size, m.in_channels),
    optim=config_lib.optimizer_spec(cfg),
    loss=config_lib.loss_spec(cfg),
    loop=spec,
    sched=schedules.make(**config_lib.schedule_kwargs(cfg["diffusion"])),
    num_classes=m.num_classes,
    use_dropout=m.dropout > 0,
    mesh=mesh,
  )
  peak = report.peak_tflops(kind, cfg["parallel"]["peak_tflops"])
  for line in report.format_report(
    sb, cs, steps_per_call=spec.steps_per_call, mesh_shape=dict(mesh.shape), device_kind=kind, peak=peak
  ):
    print(line)
  return 0
