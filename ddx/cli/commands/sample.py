"""``python -m ddx sample --workdir=W [--sampler=ddim --steps=50 --num=64 --eta=0 --guidance=2 --label=3 --seed=0]``.

Rebuilds the model, schedule and sampler from the workdir alone (EMA weights unless
``--nouse_ema``), shards the batch over every device, and writes a PNG grid and an ``.npz``
(process 0). Samples that are not finite are refused: nothing is written and the exit status
is non-zero. A latent diffusion model's samples are decoded by the autoencoder its config
names (``latent`` section), so the files hold images either way. Flags not given fall back to
the workdir config's ``sample`` section.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import flags

from ddx import images, samplers
from ddx.cli import limits, restore
from ddx.cli.commands import common
from ddx.training import checkpoint

HELP = "sample from a workdir's checkpoint: --workdir=... [--sampler --steps --num ...]"
FLAGS = flags.FlagValues()
common.define_workdir(FLAGS)
flags.DEFINE_string(
  "sampler",
  None,
  "ddpm | ddim | plms | dpm_solver++[_3m][_sde] | unipc | euler | euler_ancestral | heun | lms (default: the config's "
  "sample.sampler).",
  flag_values=FLAGS,
)
flags.DEFINE_integer("steps", None, "Sampling steps S (default: the config's sample.steps).", flag_values=FLAGS)
flags.DEFINE_integer("num", None, "Number of samples (default: the config's sample.num).", flag_values=FLAGS)
flags.DEFINE_float("eta", None, "DDIM eta (default: the config's sample.eta).", flag_values=FLAGS)
common.define_sigmas(FLAGS)
common.define_guidance_options(FLAGS)
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (class-conditional models).", flag_values=FLAGS)
flags.DEFINE_integer("label", None, "Class label of every sample (default: cycle 0..num_classes-1).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed.", flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_bool("use_ema", True, "Use the EMA weights (else the raw params).", flag_values=FLAGS)
flags.DEFINE_string(
  "out", None, "Output prefix (default: <workdir>/samples/sample_<step>_<sampler><steps>).", flag_values=FLAGS
)
common.define_distributed(FLAGS)


def main(argv: list[str]) -> int:
  del argv
  if FLAGS.out is not None and not FLAGS.out.strip():
    raise ValueError("--out: must be a non-empty path prefix")
  workdir = common.workdir(FLAGS)
  # each flag's own range first: nothing is read, built or written for a bad one
  steps = common.check_int(FLAGS, "steps", lo=1, hi=limits.MAX_TIMESTEPS)
  num = common.check_int(FLAGS, "num", lo=1, hi=limits.MAX_SAMPLES)
  eta = common.check_float(FLAGS, "eta", lo=0.0, hi=limits.MAX_ETA)
  scale = common.check_float(FLAGS, "guidance", lo=limits.MIN_GUIDANCE, hi=limits.MAX_GUIDANCE)
  label = common.check_int(FLAGS, "label", lo=0)
  common.check_int(FLAGS, "seed", lo=0, hi=limits.MAX_SEED)
  checkpoint_step = common.check_int(FLAGS, "checkpoint_step", lo=0, hi=limits.MAX_STEP)
  common.check_distributed(FLAGS)
  if FLAGS.sampler is not None and FLAGS.sampler not in samplers.NAMES:
    raise ValueError(f"--sampler: must be one of {samplers.NAMES}, got {FLAGS.sampler!r}")
  # then the ranges that depend on the model
  cfg = checkpoint.read_config(workdir)  # clear error for a missing / empty workdir
  if cfg.get("kind", "diffusion") != "diffusion":
    raise ValueError(
      f"--workdir: holds an {cfg['kind']}, not a diffusion model; sample from a latent model "
      "trained on it (latent.autoencoder_workdir)"
    )
  latent_ae = (cfg.get("latent") or {}).get("autoencoder_workdir")
  defaults = cfg.get("sample", {})
  sampler_name = FLAGS.sampler if FLAGS.sampler is not None else defaults.get("sampler", "ddim")
  if sampler_name not in samplers.NAMES:
    raise ValueError(f"sample.sampler: must be one of {samplers.NAMES}, got {sampler_name!r} (workdir config)")
  common.check_eta_sampler(eta, sampler_name)
  grid = common.check_sigmas(FLAGS, sampler_name)
  T = cfg["diffusion"].get("num_timesteps", 1000)
  if steps is not None and steps > T:
    raise ValueError(f"--steps: must be <= {T} (the model's diffusion.num_timesteps), got {steps}")
  steps = steps if steps is not None else defaults.get("steps", 50)
  num = num if num is not None else defaults.get("num", 64)
  eta = eta if eta is not None else defaults.get("eta", 0.0)
  scale = scale if scale is not None else defaults.get("guidance", 1.0)
  num_classes = cfg["model"].get("num_classes")
  if label is not None and not num_classes:
    raise ValueError("--label: this model is unconditional")
  if label is not None and label > num_classes:
    raise ValueError(f"--label: must be in [0, {num_classes}] ({num_classes} = unconditional), got {label}")
  if scale != 1.0 and not num_classes:
    raise ValueError("--guidance: classifier-free guidance needs a class-conditional model")
  rescale, interval = common.check_guidance_options(FLAGS, scale != 1.0)
  step = checkpoint.resolve_step(workdir, checkpoint_step)
  if latent_ae:
    checkpoint.read_trained_config(latent_ae, "autoencoder", name="latent.autoencoder_workdir (workdir config)")
  common.init_distributed(FLAGS)

  which = "ema_params" if FLAGS.use_ema else "params"
  s = restore.for_sampling(
    workdir,
    sampler_name,
    steps,
    eta=eta,
    which=which,
    step=step,
    guidance_scale=scale,
    config=cfg,
    sigmas=grid,
    guidance_rescale=rescale,
    guidance_interval=interval,
  )
  labels = restore.labels_for(cfg, num, label)
  t0 = time.time()
  x = s.images(jax.random.key(FLAGS.seed), num, labels)
  bad = int(np.size(x) - np.isfinite(x).sum())
  if bad:
    raise ValueError(
      f"samples: {bad} of {np.size(x)} values are not finite (checkpoint step {s.step}, {which}); nothing written"
    )
  dt = time.time() - t0
  if jax.process_index() == 0:
    name = f"sample_{s.step:08d}_{sampler_name.replace('+', 'p')}{steps}" + (f"_{grid}" if grid else "")
    prefix = FLAGS.out if FLAGS.out is not None else os.path.join(workdir, "samples", name)
    png, npz = images.save_samples(prefix, x, labels, scale=max(1, 128 // x.shape[1]))
    print(f"wrote {png} and {npz} ({num} samples, {sampler_name} {steps} steps, {dt:.1f}s incl. compile)")
  return 0
