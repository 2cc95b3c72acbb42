"""``python -m ddx invert --workdir=W --input=a.png[,b.png...] [--steps=50]``.

DDIM inversion of PNG images (the model's size and channels) to their latents x_T, then the
reconstruction by sampling those latents on the same grid (DDIM, eta 0, no clipping). Writes
``<out>.npz`` (inputs, latents, reconstructions) and ``<out>.png`` (one row per input: input,
latent clipped to [-1, 1], reconstruction) and prints the per-dimension MSE on the [0, 1] scale.
"""

from __future__ import annotations

import numpy as np
from absl import flags

import ddx
from ddx import edit, parallel
from ddx.cli.commands import common

HELP = "DDIM-invert PNG images to latents and reconstruct them: --workdir=... --input=a.png[,b.png]"
FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
flags.DEFINE_string(
  "input", None, "Comma-separated PNG files (the model's size; grey for 1 channel).", flag_values=FLAGS
)
flags.DEFINE_integer("steps", None, "DDIM steps S (default: the config's sample.steps).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  m = common.EditModel(FLAGS)
  steps = common.check_steps(FLAGS, m.T)
  steps = steps if steps is not None else m.cfg.get("sample", {}).get("steps", 50)
  paths = common.check_paths(FLAGS, "input")
  x0 = m.load_images(paths, "--input")

  sampler = m.sampler("ddim", steps, eta=0.0, clip_sample=False)
  model_fn = m.model_fn(len(paths))
  x_T = edit.invert(model_fn, sampler, x0, progress=common.progress_printer("invert"))
  rec = parallel.to_host(ddx.sample(model_fn, sampler, x_T, progress=common.progress_printer("reconstruct")))
  x_T = parallel.to_host(x_T)
  mse = float(np.mean(((np.asarray(rec) - x0) / 2.0) ** 2))
  rows = np.stack([x0, np.clip(x_T, -1, 1), rec], 1).reshape((-1,) + x0.shape[1:])
  png, npz = common.write_outputs(
    m.prefix(f"invert_ddim{steps}"), rows, 3, max(1, 128 // m.size), inputs=x0, latents=x_T, reconstructions=rec
  )
  print(
    f"wrote {png} and {npz} ({len(paths)} images, DDIM {steps} steps; reconstruction MSE per dim on [0, 1]: {mse:.3g})"
  )
  return 0
