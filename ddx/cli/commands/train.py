"""``python -m ddx train --config=configs/digits.py --workdir=runs/digits [--config.train.total_steps=...]``.

Trains (or resumes) in --workdir: the config is validated before anything is built, then
translated into the explicit arguments of `ddx.training.loop.run`. Three kinds of run share
the loop, the checkpoints and resume:

* a pixel-space diffusion model (``kind="diffusion"``);
* a KL autoencoder (``kind="autoencoder"``), then the reconstruction error of the held-out
  records (``autoencoder.holdout``) with the EMA weights of its last checkpoint
  (`ddx.training.autoencoder.report_reconstruction`);
* a latent diffusion model (``latent.autoencoder_workdir``): the data are replaced by their
  latents under that frozen autoencoder (`ddx.latent.data`) and the sample grids are decoded.
  The autoencoder step and the scaling factor are resolved once and recorded in
  ``config.json``'s ``latent`` section (a resumed run reuses them), where ``ddx sample`` finds them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from ddx import data, schedules, storage
from ddx.cli import config as config_lib
from ddx.cli import limits, restore
from ddx.cli.commands import common
from ddx.data.arrays import holdout_split
from ddx.eval import quality
from ddx.latent import data as latent_data
from ddx.models import AutoencoderKL, UNet
from ddx.training import autoencoder as autoencoder_lib
from ddx.training import checkpoint, loop

HELP = "train (or resume) a model: --config=... --workdir=..."
FLAGS = flags.FlagValues()
common.define_workdir(FLAGS)
config_flags.DEFINE_config_file(
  "config",
  None,
  "An ml_collections config file (configs/*.py); override keys with --config.section.key=value.",
  flag_values=FLAGS,
  lock_config=True,
)
flags.DEFINE_integer(
  "stop_after_steps",
  None,
  "Stop (with a checkpoint) after this many steps of this invocation, as a preemption would.",
  flag_values=FLAGS,
)
common.define_distributed(FLAGS)


def main(argv: list[str]) -> int:
  del argv
  workdir = common.workdir(FLAGS)
  common.require(FLAGS, "config")
  stop_after = common.check_int(FLAGS, "stop_after_steps", lo=1, hi=limits.MAX_STEP)
  common.check_distributed(FLAGS)
  cfg = config_lib.validate(FLAGS.config)  # before any JAX work
  common.init_distributed(FLAGS)
  d = cfg["data"]
  source = data.make_source(d["name"], split=d["split"], data_dir=d["data_dir"], image_size=d["image_size"] or None)
  if cfg["kind"] == "autoencoder":
    train_autoencoder(workdir, cfg, source, stop_after)
  else:
    train_diffusion(workdir, cfg, source, stop_after)
  return 0


def train_diffusion(workdir: str, cfg: dict, source, stop_after: int | None) -> dict:
  """Train a pixel-space or latent diffusion model (a validated config); returns the summary."""
  decode = None
  if cfg["latent"]["autoencoder_workdir"]:
    source, decode = _latent_source(workdir, cfg, source)
  h, _, c = source.image_shape
  m = config_lib.model_config(cfg)
  cfg["model"] = m.to_json()  # config.json's model section: normalised, what the checkpoints hold
  if (m.image_size, m.in_channels) != (h, c):
    raise ValueError(
      f"model.image_size: image_size/in_channels ({m.image_size}, {m.in_channels}) do not match the data ({h}, {c})"
    )
  if m.num_classes and source.num_classes > m.num_classes:
    raise ValueError(f"model.num_classes: {m.num_classes} < the data's {source.num_classes} classes")
  s = cfg["sample"]
  sample = loop.SampleSpec(
    sampler=s["sampler"],
    steps=s["steps"],
    num=s["num"],
    guidance=s["guidance"],
    sampler_kwargs=config_lib.sampler_kwargs(
      cfg["diffusion"], sampler=s["sampler"], eta=s["eta"], clip_sample=s["clip_sample"]
    ),
  )
  evaluation = _eval_spec(cfg, source, workdir) if cfg["train"]["eval_every"] else None
  summary = loop.run(
    workdir,
    cfg,
    model_factory=lambda rngs: UNet(m, rngs=rngs),
    num_classes=m.num_classes,
    use_dropout=m.dropout > 0,
    source=source,
    sched=schedules.make(**config_lib.schedule_kwargs(cfg["diffusion"])),
    optim=config_lib.optimizer_spec(cfg),
    loss=config_lib.loss_spec(cfg),
    loop=config_lib.loop_spec(cfg),
    sample=sample,
    evaluation=evaluation,
    stop_after_steps=stop_after,
    decode=decode,
  )
  print_summary(summary)
  return summary


def train_autoencoder(workdir: str, cfg: dict, source, stop_after: int | None) -> dict:
  """Train a KL autoencoder (a validated ``kind="autoencoder"`` config), then report the
  held-out reconstruction error; returns the summary."""
  held_out = None
  if cfg["autoencoder"]["holdout"]:
    try:
      source, held_out = holdout_split(source, cfg["autoencoder"]["holdout"])
    except ValueError as e:
      raise ValueError(f"autoencoder.holdout: {str(e).split(': ', 1)[1]}") from None
  ae = config_lib.autoencoder_config(cfg, in_channels=source.image_shape[-1])
  cfg["model"] = ae.to_json()  # config.json's model section: what the checkpoints hold
  summary = loop.run(
    workdir,
    cfg,
    model_factory=lambda rngs: AutoencoderKL(ae, rngs=rngs),
    num_classes=None,
    use_dropout=False,
    source=source,
    sched=None,
    optim=config_lib.optimizer_spec(cfg),
    loss=config_lib.autoencoder_loss_spec(cfg),
    loop=config_lib.loop_spec(cfg),
    sample=loop.SampleSpec(),
    stop_after_steps=stop_after,
  )
  print_summary(summary)
  if held_out is not None and jax.process_index() == 0:
    vae, _, step = restore.load_autoencoder(workdir)
    autoencoder_lib.report_reconstruction(vae, held_out.images, workdir, step)
  return summary


def _latent_source(workdir: str, cfg: dict, source):
  """``(latent source, decode)`` for a latent diffusion config; fills ``cfg["latent"]``."""
  lat = dict(cfg["latent"])
  lat["autoencoder_workdir"] = storage.normalize(lat["autoencoder_workdir"], "latent.autoencoder_workdir")
  try:  # a resumed run keeps the autoencoder step and scaling factor it started with
    previous = checkpoint.read_config(workdir).get("latent") or {}
  except (FileNotFoundError, ValueError):
    previous = {}
  if previous.get("autoencoder_workdir") == lat["autoencoder_workdir"]:
    for key in ("autoencoder_step", "scaling_factor"):
      if lat[key] is None:
        lat[key] = previous.get(key)
  vae, _, lat["autoencoder_step"] = restore.load_autoencoder(lat["autoencoder_workdir"], step=lat["autoencoder_step"])
  means, stds, labels = latent_data.encode_source(vae, source)
  if lat["scaling_factor"] is None:
    lat["scaling_factor"] = latent_data.estimate_scaling_factor(means)
  cfg["latent"] = lat
  sf = lat["scaling_factor"]
  print(
    f"latents: {means.shape[0]} x {means.shape[1:]} from {lat['autoencoder_workdir']} step "
    f"{lat['autoencoder_step']} (posterior means); std {np.std(means):.4g}, mean {np.mean(means):.4g}, "
    f"scaling factor {sf:.4g}; mean posterior std x scaling factor {np.mean(stds) * sf:.3g}",
    flush=True,
  )
  decoder = restore.load_latent_decoder(cfg)
  return (
    latent_data.latent_source(means, labels, source.num_classes, sf),
    lambda z: restore.decode_latents(decoder, z),
  )


def print_summary(summary: dict) -> None:
  shown = {k: v for k, v in summary.items() if k != "state"}
  if shown["preempted"]:
    print(f"stopped at step {shown['step']} after a preemption signal; rerun the same command to resume")
  print("summary: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in shown.items()}))


def _eval_spec(cfg: dict, source, workdir: str) -> loop.EvalSpec:
  """The loop's EvalSpec from the validated ``eval`` section: the feature network and the
  training data's reference statistics (cached under eval.cache_dir, default <workdir>/eval_cache)."""
  e, d = cfg["eval"], cfg["data"]
  try:
    net = quality.feature_net(e["features"], e["inception_weights"])
  except ValueError as err:
    raise ValueError(f"eval.{err}") from None
  cache_dir = (
    storage.normalize(e["cache_dir"], "eval.cache_dir")
    if e["cache_dir"]
    else os.path.join(storage.normalize(workdir, "--workdir"), "eval_cache")
  )
  ref = quality.reference_for_source(
    net, source, cache_dir=cache_dir, dataset=d["name"], split=d["split"], batch=e["batch"]
  )
  kwargs = config_lib.sampler_kwargs(
    cfg["diffusion"], sampler=e["sampler"], eta=e["eta"], clip_sample=cfg["sample"]["clip_sample"]
  )
  return loop.EvalSpec(
    net=net,
    reference=ref,
    sampler=e["sampler"],
    steps=e["steps"],
    sampler_kwargs=kwargs,
    num=e["num"],
    batch=e["batch"],
  )
