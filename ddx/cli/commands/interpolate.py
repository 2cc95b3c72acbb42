"""``python -m ddx interpolate --workdir=W (--seeds=1,2 | --input=a.png,b.png) [--num=8 --steps=50]``.

Spherical interpolation (DDIM paper App. D.5) between two latents, either drawn from two seeds
or obtained by DDIM inversion of two PNG images, each decoded by DDIM (eta 0, no clipping) on
one grid. Writes ``<out>.png`` (one row: alpha = 0 .. 1) and ``<out>.npz`` (latents, samples, alphas).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import ddx
from ddx import edit, parallel
from ddx.cli import limits
from ddx.cli.commands import common

HELP = "slerp between two seeds or two inverted images: --workdir=... --seeds=1,2 | --input=a.png,b.png [--num=8]"
FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
flags.DEFINE_string("seeds", None, "Two comma-separated integer seeds for the end latents.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "Two comma-separated PNG files to invert for the end latents.", flag_values=FLAGS)
flags.DEFINE_integer("num", 8, "Images per row, the two ends included (>= 2).", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "DDIM steps S (default: the config's sample.steps).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  m = common.EditModel(FLAGS)
  num = common.check_int(FLAGS, "num", lo=2, hi=limits.MAX_PER_INPUT)
  steps = common.check_steps(FLAGS, m.T)
  steps = steps if steps is not None else m.cfg.get("sample", {}).get("steps", 50)
  seeds = None
  if FLAGS.seeds is not None:
    try:
      seeds = [int(s) for s in FLAGS.seeds.split(",")]
    except ValueError:
      raise ValueError(f"--seeds: expected two comma-separated integers, got {FLAGS.seeds!r}") from None
    if len(seeds) != 2:
      raise ValueError(f"--seeds: expected two comma-separated integers, got {FLAGS.seeds!r}")
    for s in seeds:
      if not 0 <= s <= limits.MAX_SEED:
        raise ValueError(f"--seeds: each seed must be in [0, {limits.MAX_SEED}], got {s}")
  if (FLAGS.seeds is None) == (FLAGS.input is None):
    raise ValueError("--seeds: give exactly one of --seeds=a,b and --input=a.png,b.png")
  paths = common.check_paths(FLAGS, "input", 2) if FLAGS.input is not None else None
  x0 = m.load_images(paths, "--input") if paths else None

  sampler = m.sampler("ddim", steps, eta=0.0, clip_sample=False)
  shape = (1, m.size, m.size, m.channels)
  if seeds is not None:
    ends = [jax.random.normal(jax.random.key(s), shape, jnp.float32) for s in seeds]
  else:
    lat = edit.invert(m.model_fn(2), sampler, x0, progress=common.progress_printer("invert"))
    ends = [lat[:1], lat[1:]]
  latents = edit.interpolation_grid(ends[0], ends[1], num)
  samples = parallel.to_host(ddx.sample(m.model_fn(num), sampler, latents, progress=common.progress_printer("decode")))
  rows = samples if x0 is None else np.concatenate([x0[:1], samples, x0[1:]])
  png, npz = common.write_outputs(
    m.prefix(f"interpolate_ddim{steps}"),
    rows,
    len(rows),
    max(1, 128 // m.size),
    latents=np.asarray(latents),
    samples=samples,
    alphas=np.linspace(0.0, 1.0, num, dtype=np.float32),
  )
  print(f"wrote {png} and {npz} ({num} interpolants, DDIM {steps} steps)")
  return 0
