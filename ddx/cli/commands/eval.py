"""``python -m ddx eval --workdir=W [--sampler=ddim --steps=50 --num=1000 --features=digits|inception]``.

Samples ``num`` images from the workdir's checkpoint (EMA weights unless ``--nouse_ema``) and
measures them against the training data (the config's ``data`` section) in the feature
space of ``--features``: Fréchet distance (FID for ``inception``), KID (mean, std) and k-NN
precision / recall (k = 3). Prints the metrics and appends one JSON line to
``W/eval.jsonl``. The reference statistics of the training data are computed once per
(feature network, dataset, split, image size) and cached under ``--cache_dir``.

Features: ``digits``, the classifier shipped with ddx (16x16x1 digits models only), or
``inception``, pytorch-fid's FID Inception from ``--inception_weights`` (a
``pt_inception-2015-12-05-6726825d.pth`` you have, or its ``.safetensors`` copy written by
``python -m ddx.eval.inception convert``; never downloaded). Every flag, the checkpoint and
the weights file are checked before anything is computed or written.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import flags

from ddx import data, samplers, storage
from ddx.cli import limits, restore
from ddx.cli.commands import common
from ddx.eval import quality
from ddx.training import checkpoint

HELP = "sample-quality metrics (FD/KID/precision/recall) of a checkpoint: --workdir=... --features=digits|inception"
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
flags.DEFINE_integer("num", 1000, "Number of samples (>= 2).", flag_values=FLAGS)
flags.DEFINE_float("eta", None, "DDIM eta (default: the config's sample.eta).", flag_values=FLAGS)
common.define_sigmas(FLAGS)
flags.DEFINE_string("features", "digits", "Feature network: digits | inception.", flag_values=FLAGS)
flags.DEFINE_string(
  "inception_weights",
  None,
  "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its .safetensors copy (with --features=inception).",
  flag_values=FLAGS,
)
flags.DEFINE_string("cache_dir", None, "Reference-statistics cache (default: <workdir>/eval_cache).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 250, "Sampling and feature batch size.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed (samples and KID subsets).", flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_bool("use_ema", True, "Use the EMA weights (else the raw params).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  workdir = common.workdir(FLAGS)
  # each flag's own range first: nothing is read, built or written for a bad one
  checkpoint_step = common.check_int(FLAGS, "checkpoint_step", lo=0, hi=limits.MAX_STEP)
  num = common.check_int(FLAGS, "num", lo=2, hi=limits.MAX_SAMPLES)
  batch = common.check_int(FLAGS, "batch", lo=1, hi=limits.MAX_BATCH)
  eta = common.check_float(FLAGS, "eta", lo=0.0, hi=limits.MAX_ETA)
  seed = common.check_int(FLAGS, "seed", lo=0, hi=limits.MAX_SEED)
  if FLAGS.cache_dir is not None and not FLAGS.cache_dir.strip():
    raise ValueError("--cache_dir: must be a non-empty path")
  # then the ranges that depend on the model
  cfg = checkpoint.read_config(workdir)
  T = cfg["diffusion"].get("num_timesteps", 1000)
  steps = common.check_steps(FLAGS, T)
  defaults = cfg.get("sample", {})
  sampler_name = FLAGS.sampler if FLAGS.sampler is not None else defaults.get("sampler", "ddim")
  if sampler_name not in samplers.NAMES:
    raise ValueError(f"--sampler: must be one of {samplers.NAMES}, got {sampler_name!r}")
  common.check_eta_sampler(eta, sampler_name)
  grid = common.check_sigmas(FLAGS, sampler_name)
  steps = steps if steps is not None else defaults.get("steps", 50)
  eta = eta if eta is not None else defaults.get("eta", 0.0)
  step = checkpoint.resolve_step(workdir, checkpoint_step)
  size, ch = cfg["model"]["image_size"], cfg["model"]["in_channels"]
  if (cfg.get("latent") or {}).get("autoencoder_workdir"):  # latent diffusion: measure the decoded images
    ae = checkpoint.read_trained_config(
      cfg["latent"]["autoencoder_workdir"], "autoencoder", name="latent.autoencoder_workdir (workdir config)"
    )["model"]
    size, ch = size * 2 ** (len(ae["block_out_channels"]) - 1), ae["in_channels"]
  quality.check_features(FLAGS.features, (size, size, ch), name="--features")
  if FLAGS.features == "inception":
    common.require(FLAGS, "inception_weights")
  data_cfg = cfg.get("data", {})
  data_size = data_cfg.get("image_size") or None
  if data_size is not None and data_size != size:
    raise ValueError(
      f"{os.path.join(workdir, 'config.json')}: data.image_size {data_size} differs from model.image_size {size}"
    )
  cache_dir = os.path.join(workdir, "eval_cache")
  if FLAGS.cache_dir is not None:
    cache_dir = storage.normalize(FLAGS.cache_dir, "--cache_dir")

  try:
    net = quality.feature_net(FLAGS.features, FLAGS.inception_weights)
  except ValueError as e:
    raise ValueError(f"--{e}" if str(e).startswith("inception_weights") else str(e)) from None
  dataset, split = data_cfg.get("name", "digits"), data_cfg.get("split", "train")
  source = data.make_source(
    dataset,
    split=split,
    data_dir=data_cfg.get("data_dir"),
    image_size=data_size,
    center_crop=data_cfg.get("center_crop"),
  )
  if tuple(source.image_shape) != (size, size, ch):
    raise ValueError(f"data: the training images are {source.image_shape}, the model makes {(size, size, ch)}")

  which = "ema_params" if FLAGS.use_ema else "params"
  s = restore.for_sampling(workdir, sampler_name, steps, eta=eta, which=which, step=step, config=cfg, sigmas=grid)
  t0 = time.time()
  ref = quality.reference_for_source(net, source, cache_dir=cache_dir, dataset=dataset, split=split, batch=batch)
  t_ref = time.time() - t0
  t0 = time.time()
  try:
    m = quality.measure(
      s.image_fn(),
      s.params,
      image_shape=s.image_shape,
      num=num,
      batch=batch,
      key=jax.random.key(seed),
      net=net,
      reference=ref,
      num_classes=s.num_classes,
      progress=lambda d, n: print(f"\rsampled {d}/{n}", end="", flush=True),
    )
  except quality.NonFiniteSamples as e:
    print()
    raise ValueError(f"{e} (checkpoint step {s.step}, {which}); nothing written") from None
  print()
  t_sample = time.time() - t0
  result = {
    "step": s.step,
    "sampler": sampler_name,
    "steps": steps,
    "sigmas": grid,
    "eta": eta,
    "num": num,
    "seed": seed,
    "weights": which,
    "features": net.name,
    "reference": {"dataset": dataset, "split": split, "num": ref.num},
    **{k: v for k, v in m.items() if k != "num"},
  }
  result["seconds"] = {"reference": round(t_ref, 2), "sampling": round(t_sample, 2)}
  if jax.process_index() == 0:
    pr = f"  precision {result['precision']:.3f}  recall {result['recall']:.3f}" if "precision" in result else ""
    label = "FID" if FLAGS.features == "inception" else "FD"
    print(
      f"step {s.step} {sampler_name} S={steps} N={num} [{net.name}]: {label} {result['fd']:.4g}  "
      f"KID {result['kid_mean']:.4g} ± {result['kid_std']:.2g}{pr}"
    )
    storage.append_text(os.path.join(workdir, "eval.jsonl"), json.dumps(result) + "\n")
  return 0
