"""``python -m ddx edit --workdir=W --input=a.png[,b.png] --strength=0.5 [--num=4 --sampler=ddim --steps=50]``.

SDEdit / img2img: each input is noised to the level chosen by ``--strength`` (diffusers'
img2img timesteps: the last ``int(S * strength)`` of the S grid points) and denoised from
there, ``--num`` times with different noise. Writes ``<out>.png`` (one row per input: the
input, then its edits) and ``<out>.npz``.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

from ddx import edit, parallel, samplers
from ddx.cli import limits
from ddx.cli.commands import common

HELP = "SDEdit / img2img from PNG images: --workdir=... --input=a.png --strength=0.5 [--num=4]"
FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
flags.DEFINE_string(
  "input", None, "Comma-separated PNG files (the model's size; grey for 1 channel).", flag_values=FLAGS
)
flags.DEFINE_float(
  "strength", None, "In (0, 1]: 1 = sample from (almost) pure noise, -> 0 = keep the input.", flag_values=FLAGS
)
flags.DEFINE_integer("num", 4, "Edits per input.", flag_values=FLAGS)
flags.DEFINE_string("sampler", "ddim", "ddim | ddpm.", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Sampling steps S (default: the config's sample.steps).", flag_values=FLAGS)
flags.DEFINE_float("eta", None, "DDIM eta (--sampler=ddim only; default 0).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  m = common.EditModel(FLAGS)
  common.require(FLAGS, "strength")
  strength = common.check_float(FLAGS, "strength")
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"--strength: must be in (0, 1], got {strength}")
  num = common.check_int(FLAGS, "num", lo=1, hi=limits.MAX_PER_INPUT)
  steps = common.check_steps(FLAGS, m.T)
  steps = steps if steps is not None else m.cfg.get("sample", {}).get("steps", 50)
  eta = common.check_float(FLAGS, "eta", lo=0.0, hi=limits.MAX_ETA)
  if FLAGS.sampler not in samplers.SINGLE_STEP_NAMES:
    raise ValueError(f"--sampler: must be one of {samplers.SINGLE_STEP_NAMES}, got {FLAGS.sampler!r}")
  common.check_eta_sampler(eta, FLAGS.sampler)
  eta = eta if eta is not None else 0.0
  paths = common.check_paths(FLAGS, "input")
  x0 = m.load_images(paths, "--input")

  sampler = m.sampler(FLAGS.sampler, steps, eta=eta)
  batch = np.repeat(x0, num, axis=0)
  out = parallel.to_host(
    edit.sdedit(
      m.model_fn(len(batch)),
      sampler,
      batch,
      strength,
      jax.random.key(FLAGS.seed),
      progress=common.progress_printer("edit"),
    )
  )
  rows = np.concatenate([x0[:, None], out.reshape((len(paths), num) + x0.shape[1:])], 1)
  png, npz = common.write_outputs(
    m.prefix(f"edit_s{strength:g}_{FLAGS.sampler}{steps}"),
    rows.reshape((-1,) + x0.shape[1:]),
    num + 1,
    max(1, 128 // m.size),
    inputs=x0,
    edits=out,
    strength=np.float32(strength),
  )
  start = edit.sdedit_start(steps, strength)
  print(f"wrote {png} and {npz} ({len(paths)} x {num} edits, {steps - start} of {steps} {FLAGS.sampler} steps)")
  return 0
