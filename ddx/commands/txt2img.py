"""``python -m ddx txt2img --pipeline=PATH --prompt=... [--sampler=plms --steps=50 --guidance=7.5]``.

Text-to-image with a local diffusers-format Stable Diffusion pipeline folder (`ddx.pipeline`:
unet/, vae/, text_encoder/, tokenizer/ and optionally scheduler/; the weights are the user's,
nothing is downloaded). Writes ``<out>.png`` (a grid) and ``<out>.npz`` (float images in
[-1, 1] and the prompts). ``--prompt`` may be repeated; each prompt gets ``--num`` images.
"""

from __future__ import annotations

import os
import time

from absl import flags

from ddx.commands import common

HELP = "text-to-image from a local Stable Diffusion pipeline folder: --pipeline=PATH --prompt=..."
FLAGS = flags.FlagValues()
flags.DEFINE_string("pipeline", None, "A diffusers-format pipeline folder (model_index.json, unet/, vae/, "
                    "text_encoder/, tokenizer/, scheduler/).", flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", None, "The prompt (repeat the flag for several).", flag_values=FLAGS)
flags.DEFINE_string("negative_prompt", "", "The unconditional prompt of classifier-free guidance.",
                    flag_values=FLAGS)
flags.DEFINE_string("sampler", "plms", "ddpm | ddim | plms | dpm_solver++ (aliases: pndm, dpmpp_2m).",
                    flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "Sampling steps.", flag_values=FLAGS)
flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1 = no unconditional branch).",
                   flag_values=FLAGS)
flags.DEFINE_float("eta", None, "DDIM eta (ddim only).", flag_values=FLAGS)
flags.DEFINE_integer("num", 1, "Images per prompt.", flag_values=FLAGS)
flags.DEFINE_integer("height", None, "Image height (default: the U-Net's sample_size x the VAE factor).",
                     flag_values=FLAGS)
flags.DEFINE_integer("width", None, "Image width (default: as height).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed (initial latents and sampler noise).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the three models.",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output prefix (default: ./txt2img_<sampler><steps>).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  out_prefix = common.check_out(FLAGS)
  common.require(FLAGS, "pipeline", "prompt")
  from ddx import limits, samplers  # pylint: disable=import-outside-toplevel
  try:
    sampler = samplers.canonical(FLAGS.sampler)
  except ValueError:
    raise ValueError(f"--sampler: must be one of {samplers.NAMES}, got {FLAGS.sampler!r}") from None
  # each flag's own range first: nothing is loaded, built or written for a bad one
  steps = common.check_int(FLAGS, "steps", lo=1, hi=limits.MAX_TIMESTEPS)
  num = common.check_int(FLAGS, "num", lo=1, hi=limits.MAX_SAMPLES)
  height = common.check_int(FLAGS, "height", lo=1, hi=limits.MAX_IMAGE_SIZE)
  width = common.check_int(FLAGS, "width", lo=1, hi=limits.MAX_IMAGE_SIZE)
  guidance = common.check_float(FLAGS, "guidance", lo=limits.MIN_GUIDANCE, hi=limits.MAX_GUIDANCE)
  eta = common.check_float(FLAGS, "eta", lo=0.0, hi=limits.MAX_ETA)
  common.check_eta_sampler(eta, sampler)
  seed = common.check_int(FLAGS, "seed", lo=0, hi=limits.MAX_SEED)
  if any(not p.strip() for p in FLAGS.prompt):
    raise ValueError("--prompt: must not be empty")
  prompts = [p for p in FLAGS.prompt for _ in range(num)]
  if len(prompts) > limits.MAX_SAMPLES:
    raise ValueError(f"--num: {len(FLAGS.prompt)} prompts x {num} images exceed {limits.MAX_SAMPLES} images")

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ddx import images, pipeline  # pylint: disable=import-outside-toplevel

  pipe = pipeline.load(FLAGS.pipeline, dtype=None if FLAGS.dtype == "float32" else FLAGS.dtype)
  # then the ranges that depend on the pipeline (before anything is compiled)
  T = pipe.diffusion["num_timesteps"]
  if steps > T:
    raise ValueError(f"--steps: must be <= {T} (the pipeline scheduler's num_train_timesteps), got {steps}")
  try:
    pipe.latent_shape(len(prompts), height, width)
  except ValueError as e:
    raise ValueError(f"--{e}") from None
  t0 = time.time()
  out = pipe.txt2img(prompts, negative_prompt=FLAGS.negative_prompt, sampler=FLAGS.sampler,
                     steps=steps, guidance=guidance, key=jax.random.key(seed),
                     height=height, width=width, eta=eta if sampler == "ddim" else None)
  out = np.asarray(out)
  dt = time.time() - t0
  common.refuse_nonfinite(f"pipeline {FLAGS.pipeline}", samples=out)
  prefix = out_prefix if out_prefix is not None else os.path.abspath(
      f"txt2img_{FLAGS.sampler.replace('+', 'p')}{steps}")
  ncols = num if len(FLAGS.prompt) > 1 else None  # one row per prompt
  png = images.save_png(prefix + ".png", images.make_grid(images.to_uint8(out), ncols))
  npz = prefix + ".npz"
  np.savez_compressed(npz, samples=out, prompts=np.asarray(prompts))
  print(f"wrote {png} and {npz} ({len(prompts)} images {out.shape[1]}x{out.shape[2]}, "
        f"{FLAGS.sampler} {steps} steps, guidance {guidance}, {dt:.1f}s incl. compile)")
  return 0
