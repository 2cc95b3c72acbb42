"""``python -m ddx inpaint --workdir=W --input=a.png --mask=m.png [--method=repaint --num=4]``.

Fills the pixels where the mask PNG is black (0) and keeps those where it is white (255), by
replacement (``--method=replace``: the known pixels are re-noised to the current level before
every model call) or RePaint (``--method=repaint``, with ``--jump_length`` and
``--jump_n_sample`` resampling). Writes ``<out>.png`` (one row per input: the input, the
masked input, the fills) and ``<out>.npz``.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

from ddx import edit, images, parallel, samplers
from ddx.cli import limits
from ddx.cli.commands import common
from ddx.edit import INPAINT_METHODS

HELP = "inpaint PNG images under a mask PNG (white = keep): --workdir=... --input=a.png --mask=m.png"
FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
flags.DEFINE_string(
  "input", None, "Comma-separated PNG files (the model's size; grey for 1 channel).", flag_values=FLAGS
)
flags.DEFINE_string("mask", None, "Mask PNG of the model's size, greyscale 0 (fill) / 255 (keep).", flag_values=FLAGS)
flags.DEFINE_string("method", "repaint", "replace | repaint.", flag_values=FLAGS)
flags.DEFINE_integer("jump_length", 10, "RePaint: grid steps per jump back up.", flag_values=FLAGS)
flags.DEFINE_integer("jump_n_sample", 10, "RePaint: passes over each jump (1 = replacement).", flag_values=FLAGS)
flags.DEFINE_integer("num", 4, "Fills per input.", flag_values=FLAGS)
flags.DEFINE_string("sampler", "ddpm", "ddpm | ddim.", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Sampling steps S (default: the config's sample.steps).", flag_values=FLAGS)
flags.DEFINE_float("eta", None, "DDIM eta (--sampler=ddim only; default 1).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  m = common.EditModel(FLAGS)
  num = common.check_int(FLAGS, "num", lo=1, hi=limits.MAX_PER_INPUT)
  steps = common.check_steps(FLAGS, m.T)
  steps = steps if steps is not None else m.cfg.get("sample", {}).get("steps", 50)
  jl = common.check_int(FLAGS, "jump_length", lo=1, hi=limits.MAX_TIMESTEPS)
  jn = common.check_int(FLAGS, "jump_n_sample", lo=1, hi=limits.MAX_JUMP_N_SAMPLE)
  eta = common.check_float(FLAGS, "eta", lo=0.0, hi=limits.MAX_ETA)
  if FLAGS.method not in INPAINT_METHODS:
    raise ValueError(f"--method: must be one of {INPAINT_METHODS}, got {FLAGS.method!r}")
  if FLAGS.sampler not in samplers.SINGLE_STEP_NAMES:
    raise ValueError(f"--sampler: must be one of {samplers.SINGLE_STEP_NAMES}, got {FLAGS.sampler!r}")
  common.check_eta_sampler(eta, FLAGS.sampler)
  eta = eta if eta is not None else 1.0
  if FLAGS.method == "repaint" and jn > 1 and jl >= steps:
    # RePaint jumps back from grid points below S - jump_length: none would be left
    raise ValueError(f"--jump_length: must be < the number of steps ({steps}) for RePaint to resample, got {jl}")
  paths = common.check_paths(FLAGS, "input")
  mask_path = common.check_paths(FLAGS, "mask", 1)[0]
  x0 = m.load_images(paths, "--input")
  mask = images.load_mask(mask_path, m.size, m.channels)

  sampler = m.sampler(FLAGS.sampler, steps, eta=eta)
  batch = np.repeat(x0, num, axis=0)
  key = jax.random.key(FLAGS.seed)
  progress = common.progress_printer(FLAGS.method)
  if FLAGS.method == "repaint":
    out = edit.repaint(m.model_fn(len(batch)), sampler, batch, mask, key, jl, jn, progress=progress)
  else:
    out = edit.inpaint(m.model_fn(len(batch)), sampler, batch, mask, key, progress=progress)
  out = parallel.to_host(out)
  masked = x0 * mask + (1 - mask) * 0.0  # unknown pixels shown mid-grey
  rows = np.concatenate([x0[:, None], masked[:, None], out.reshape((len(paths), num) + x0.shape[1:])], 1)
  png, npz = common.write_outputs(
    m.prefix(f"inpaint_{FLAGS.method}_{FLAGS.sampler}{steps}"),
    rows.reshape((-1,) + x0.shape[1:]),
    num + 2,
    max(1, 128 // m.size),
    inputs=x0,
    mask=mask,
    fills=out,
  )
  print(f"wrote {png} and {npz} ({len(paths)} x {num} fills, {FLAGS.method}, {FLAGS.sampler} {steps} steps)")
  return 0
