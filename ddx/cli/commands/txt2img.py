"""``python -m ddx txt2img --pipeline=PATH --prompt=... [--sampler=plms --steps=50 --guidance=7.5]``.

Text-to-image with a local diffusers-format Stable Diffusion pipeline folder (`ddx.latent.pipeline`:
unet/, vae/, text_encoder/, tokenizer/ and optionally scheduler/; the weights are the user's,
nothing is downloaded). Writes ``<out>.png`` (a grid) and ``<out>.npz`` (float images in
[-1, 1] and the prompts). ``--prompt`` may be repeated; each prompt gets ``--num`` images.

With ``--init_image=a.png`` it edits that image instead (its size is the output size):
img2img (SDEdit in latent space, `ddx.latent.img2img`) with ``--strength`` (default 0.75),
or, with ``--mask=m.png`` (greyscale, white = keep, black = fill, the image's size),
inpainting (`ddx.latent.inpaint`; ``--paste`` puts the input pixels back where the mask is
white). Both need the ddim (the default then) or ddpm sampler.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import flags

from ddx import images, latent, samplers, storage
from ddx.cli import limits
from ddx.cli.commands import common
from ddx.latent import pipeline

HELP = (
  "text-to-image (or img2img / inpainting with --init_image [--mask]) from a local Stable Diffusion "
  "pipeline folder: --pipeline=PATH --prompt=..."
)
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "pipeline",
  None,
  "A diffusers-format pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).",
  flag_values=FLAGS,
)
flags.DEFINE_multi_string("prompt", None, "The prompt (repeat the flag for several).", flag_values=FLAGS)
flags.DEFINE_string("negative_prompt", "", "The unconditional prompt of classifier-free guidance.", flag_values=FLAGS)
flags.DEFINE_string(
  "sampler",
  "plms",
  "ddpm | ddim | plms | dpm_solver++ (aliases: pndm, dpmpp_2m); with --init_image ddim (default) or ddpm.",
  flag_values=FLAGS,
)
flags.DEFINE_integer("steps", 50, "Sampling steps.", flag_values=FLAGS)
flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1 = no unconditional branch).", flag_values=FLAGS)
flags.DEFINE_float("eta", None, "DDIM eta (ddim only).", flag_values=FLAGS)
common.define_sigmas(FLAGS)
common.define_guidance_options(FLAGS)
flags.DEFINE_integer("num", 1, "Images per prompt.", flag_values=FLAGS)
flags.DEFINE_integer(
  "height", None, "Image height (default: the U-Net's sample_size x the VAE factor).", flag_values=FLAGS
)
flags.DEFINE_integer("width", None, "Image width (default: as height).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed (initial latents and sampler noise).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the three models.", flag_values=FLAGS)
flags.DEFINE_string(
  "init_image",
  None,
  "An RGB PNG to edit (img2img, or inpainting with --mask); its size "
  "must be a multiple of the VAE factor x the U-Net's downsampling.",
  flag_values=FLAGS,
)
flags.DEFINE_float(
  "strength",
  None,
  "img2img strength in (0, 1] (default 0.75): 1 = from (almost) pure noise, -> 0 = keep the image.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "mask", None, "Inpainting mask PNG of the init image's size, greyscale 0 (fill) / 255 (keep).", flag_values=FLAGS
)
flags.DEFINE_bool("paste", False, "Inpainting: paste the input pixels back where the mask is white.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output prefix (default: ./txt2img_<sampler><steps>).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  out_prefix = common.check_out(FLAGS)
  common.require(FLAGS, "pipeline", "prompt")
  try:
    sampler = samplers.canonical(FLAGS.sampler)
  except ValueError:
    raise ValueError(f"--sampler: must be one of {samplers.NAMES}, got {FLAGS.sampler!r}") from None
  label = FLAGS.sampler
  if FLAGS.init_image is not None and not FLAGS["sampler"].present:
    sampler = label = "ddim"  # editing needs a single-step sampler
  # each flag's own range first: nothing is loaded, built or written for a bad one
  steps = common.check_int(FLAGS, "steps", lo=1, hi=limits.MAX_TIMESTEPS)
  num = common.check_int(FLAGS, "num", lo=1, hi=limits.MAX_SAMPLES)
  height = common.check_int(FLAGS, "height", lo=1, hi=limits.MAX_IMAGE_SIZE)
  width = common.check_int(FLAGS, "width", lo=1, hi=limits.MAX_IMAGE_SIZE)
  guidance = common.check_float(FLAGS, "guidance", lo=limits.MIN_GUIDANCE, hi=limits.MAX_GUIDANCE)
  rescale, interval = common.check_guidance_options(FLAGS, guidance != 1.0)
  eta = common.check_float(FLAGS, "eta", lo=0.0, hi=limits.MAX_ETA)
  common.check_eta_sampler(eta, sampler)
  grid = common.check_sigmas(FLAGS, sampler)
  seed = common.check_int(FLAGS, "seed", lo=0, hi=limits.MAX_SEED)
  strength = common.check_float(FLAGS, "strength")
  if strength is not None and not 0.0 < strength <= 1.0:
    raise ValueError(f"--strength: must be in (0, 1], got {strength}")
  init, mask_path = FLAGS.init_image, None
  if init is None:
    for name in ("strength", "mask"):
      if FLAGS[name].value is not None:
        raise ValueError(f"--{name}: needs --init_image")
    if FLAGS.paste:
      raise ValueError("--paste: needs --init_image and --mask")
  else:
    init = common.check_paths(FLAGS, "init_image", 1)[0]
    for name in ("height", "width"):
      if FLAGS[name].value is not None:
        raise ValueError(f"--{name}: not used with --init_image (the image's size is the output size)")
    for name in ("guidance_rescale", "guidance_interval"):
      if FLAGS[name].value is not None:
        raise ValueError(f"--{name}: applies to txt2img, not to an --init_image edit")
    if FLAGS.mask is not None:
      mask_path = common.check_paths(FLAGS, "mask", 1)[0]
      if strength is not None:
        raise ValueError("--strength: not used with --mask (inpainting runs the whole grid)")
    elif FLAGS.paste:
      raise ValueError("--paste: needs --mask")
    if sampler not in ("ddim", "ddpm"):
      raise ValueError(
        f"--sampler: editing an --init_image needs ddim or ddpm (the run starts mid-grid "
        f"or pastes after every step), got {FLAGS.sampler}"
      )
    strength = 0.75 if strength is None else strength
  if any(not p.strip() for p in FLAGS.prompt):
    raise ValueError("--prompt: must not be empty")
  prompts = [p for p in FLAGS.prompt for _ in range(num)]
  if len(prompts) > limits.MAX_SAMPLES:
    raise ValueError(f"--num: {len(FLAGS.prompt)} prompts x {num} images exceed {limits.MAX_SAMPLES} images")

  pipe = pipeline.load(FLAGS.pipeline, dtype=None if FLAGS.dtype == "float32" else FLAGS.dtype)
  # then the ranges that depend on the pipeline (before anything is compiled)
  T = pipe.diffusion["num_timesteps"]
  if steps > T:
    raise ValueError(f"--steps: must be <= {T} (the pipeline scheduler's num_train_timesteps), got {steps}")
  kw = dict(
    negative_prompt=FLAGS.negative_prompt,
    sampler=label,
    steps=steps,
    guidance=guidance,
    key=jax.random.key(seed),
    eta=eta if sampler == "ddim" else None,
  )
  if grid is not None:
    kw["sigmas"] = grid
  if rescale or interval:
    kw.update(guidance_rescale=rescale, guidance_interval=interval)
  extra = {}
  if init is None:
    kind = "txt2img"
    try:
      pipe.latent_shape(len(prompts), height, width)
    except ValueError as e:
      raise ValueError(f"--{e}") from None
    t0 = time.time()
    out = pipe.txt2img(prompts, height=height, width=width, **kw)
  else:
    size = images.png_size(init, "--init_image")
    image = images.load_png(init, size, pipe.vae.in_channels, "--init_image")
    try:
      latent.check_image(pipe.unet, pipe.vae, image[None])
    except ValueError as e:
      raise ValueError(f"--init_image: {init}: {str(e).split(': ', 1)[1]}") from None
    extra["init_image"] = image
    if mask_path is not None:
      extra["mask"] = images.load_mask(mask_path, size, 1)[..., 0]
    t0 = time.time()
    if mask_path is None:
      kind = "img2img"
      extra["strength"] = np.float32(strength)
      out = pipe.img2img(prompts, image, strength=strength, **kw)
    else:
      kind = "inpaint"
      out = pipe.inpaint(prompts, image, extra["mask"], paste=FLAGS.paste, **kw)
  out = np.asarray(out)
  dt = time.time() - t0
  common.refuse_nonfinite(f"pipeline {FLAGS.pipeline}", samples=out)
  prefix = out_prefix if out_prefix is not None else os.path.abspath(f"{kind}_{label.replace('+', 'p')}{steps}")
  ncols = num if len(FLAGS.prompt) > 1 else None  # one row per prompt
  png = images.save_png(prefix + ".png", images.make_grid(images.to_uint8(out), ncols))
  npz = storage.save_npz(prefix + ".npz", samples=out, prompts=np.asarray(prompts), **extra)
  print(
    f"wrote {png} and {npz} ({kind}, {len(prompts)} images {out.shape[1]}x{out.shape[2]}, "
    f"{label} {steps} steps, guidance {guidance}, {dt:.1f}s incl. compile)"
  )
  return 0
