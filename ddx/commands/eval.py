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

from absl import flags

from ddx.commands import common

HELP = "sample-quality metrics (FD/KID/precision/recall) of a checkpoint: --workdir=... --features=digits|inception"
FEATURES = ("digits", "inception")
FLAGS = flags.FlagValues()
common.define_workdir(FLAGS)
flags.DEFINE_string("sampler", None, "ddpm | ddim | plms | dpm_solver++ (default: the config's sample.sampler).",
                    flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Sampling steps S (default: the config's sample.steps).", flag_values=FLAGS)
flags.DEFINE_integer("num", 1000, "Number of samples (>= 2).", flag_values=FLAGS)
flags.DEFINE_float("eta", None, "DDIM eta (default: the config's sample.eta).", flag_values=FLAGS)
flags.DEFINE_string("features", "digits", "Feature network: digits | inception.", flag_values=FLAGS)
flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its "
                    ".safetensors copy (with --features=inception).", flag_values=FLAGS)
flags.DEFINE_string("cache_dir", None, "Reference-statistics cache (default: <workdir>/eval_cache).",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch", 250, "Sampling and feature batch size.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed (samples and KID subsets).", flag_values=FLAGS)
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_bool("use_ema", True, "Use the EMA weights (else the raw params).", flag_values=FLAGS)

MAX_NUM = 1 << 20
PR_K = 3


def _reference_batches(source, batch: int):
  import numpy as np  # pylint: disable=import-outside-toplevel
  for s in range(0, len(source), batch):
    yield np.stack([source[i]["image"] for i in range(s, min(s + batch, len(source)))])


def main(argv: list[str]) -> int:
  del argv
  workdir = common.workdir(FLAGS)
  from ddx import checkpoint, samplers  # pylint: disable=import-outside-toplevel
  cfg = checkpoint.read_config(workdir)
  step = checkpoint.resolve_step(workdir, common.check_int(FLAGS, "checkpoint_step", lo=0))
  defaults = cfg.get("sample", {})
  sampler_name = FLAGS.sampler if FLAGS.sampler is not None else defaults.get("sampler", "ddim")
  if sampler_name not in samplers.NAMES:
    raise ValueError(f"--sampler: must be one of {samplers.NAMES}, got {sampler_name!r}")
  T = cfg["diffusion"].get("num_timesteps", 1000)
  steps = common.check_int(FLAGS, "steps", lo=1, hi=T)
  steps = steps if steps is not None else defaults.get("steps", 50)
  num = common.check_int(FLAGS, "num", lo=2, hi=MAX_NUM)
  batch = common.check_int(FLAGS, "batch", lo=1)
  eta = common.check_float(FLAGS, "eta", lo=0.0)
  eta = eta if eta is not None else defaults.get("eta", 0.0)
  seed = common.check_int(FLAGS, "seed", lo=0)
  if FLAGS.features not in FEATURES:
    raise ValueError(f"--features: must be one of {FEATURES}, got {FLAGS.features!r}")
  size, ch = cfg["model"]["image_size"], cfg["model"]["in_channels"]
  if FLAGS.features == "digits" and (size, ch) != (16, 1):
    raise ValueError(f"--features: digits takes 16x16x1 images; this model makes {size}x{size}x{ch} "
                     "(use --features=inception)")
  if FLAGS.features == "inception":
    common.require(FLAGS, "inception_weights")
  data = cfg.get("data", {})
  data_size = data.get("image_size") or None
  if data_size is not None and data_size != size:
    raise ValueError(f"{os.path.join(workdir, 'config.json')}: data.image_size {data_size} differs from "
                     f"model.image_size {size}")
  cache_dir = os.path.abspath(FLAGS.cache_dir) if FLAGS.cache_dir else os.path.join(workdir, "eval_cache")

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import ddx.data  # pylint: disable=import-outside-toplevel
  from ddx import eval as ev  # pylint: disable=import-outside-toplevel
  from ddx import parallel, service  # pylint: disable=import-outside-toplevel
  from ddx import train as train_lib  # pylint: disable=import-outside-toplevel
  from ddx.eval import features as feat_lib  # pylint: disable=import-outside-toplevel

  if FLAGS.features == "inception":
    from ddx.eval import inception  # pylint: disable=import-outside-toplevel
    try:
      net = inception.load(FLAGS.inception_weights)
    except ValueError as e:
      raise ValueError(f"--{e}") from None
  else:
    from ddx.eval import digits_net  # pylint: disable=import-outside-toplevel
    net = digits_net.load()
  source = ddx.data.make_source(data.get("name", "digits"), split=data.get("split", "train"),
                                data_dir=data.get("data_dir"), image_size=data_size,
                                center_crop=data.get("center_crop"))
  if tuple(source.image_shape) != (size, size, ch):
    raise ValueError(f"data: the training images are {source.image_shape}, the model makes {(size, size, ch)}")

  _, sampler = service.make_sampler(cfg, sampler_name, steps, eta=eta, clip_sample=defaults.get("clip_sample", True))
  which = "ema_params" if FLAGS.use_ema else "params"
  model, _, step = service.load_model(workdir, which=which, step=step)
  t0 = time.time()
  ref = feat_lib.reference_stats(net, lambda: _reference_batches(source, batch), cache_dir=cache_dir,
                                 dataset=data.get("name", "digits"), split=data.get("split", "train"),
                                 image_size=size, batch_size=batch)
  t_ref = time.time() - t0

  graphdef, params = nnx.split(model, nnx.Param)
  mesh = parallel.data_mesh()
  # The restored weights sit on one device; the noise is sharded over the whole mesh.
  params = train_lib.replicate(params, mesh)
  num_classes = cfg["model"].get("num_classes")
  fn = service.make_sample_fn(graphdef, sampler, num_classes, mesh)
  # Every call samples a full batch (the last one is cut): one compiled shape.
  bs = min(batch, num)
  num_batches = -(-num // bs)
  labels = service.default_labels(num_batches * bs, num_classes, None)
  key = jax.random.key(seed)
  t0 = time.time()
  samples = []
  for b in range(num_batches):
    lab = None if labels is None else labels[b * bs:(b + 1) * bs]
    samples.append(service.to_host(fn(params, jax.random.fold_in(jax.random.fold_in(key, 0), b), (bs, size, size, ch),
                                      lab)))
    print(f"\rsampled {min((b + 1) * bs, num)}/{num}", end="", flush=True)
  print()
  x = np.concatenate(samples)[:num]
  bad = int(np.size(x) - np.isfinite(x).sum())
  if bad:
    raise ValueError(f"samples: {bad} of {np.size(x)} values are not finite (checkpoint step {step}, {which}); "
                     "nothing written")
  t_sample = time.time() - t0
  feats = feat_lib.compute_features(net, np.clip(x, -1.0, 1.0), batch)
  result = {
      "step": step, "sampler": sampler_name, "steps": steps, "eta": eta, "num": num, "seed": seed,
      "weights": which, "features": net.name,
      "reference": {"dataset": data.get("name", "digits"), "split": data.get("split", "train"), "num": ref.num},
      "fd": ev.frechet_distance_from_stats(*ev.feature_stats(feats), ref.mu, ref.sigma),
  }
  kid_mean, kid_std = ev.kid(feats, ref.features, jax.random.fold_in(key, 1))
  result.update(kid_mean=kid_mean, kid_std=kid_std)
  if num > PR_K:
    p, r = ev.precision_recall(ref.features, feats, k=PR_K)
    result.update(precision=p, recall=r)
  result["seconds"] = {"reference": round(t_ref, 2), "sampling": round(t_sample, 2)}
  if jax.process_index() == 0:
    pr = (f"  precision {result['precision']:.3f}  recall {result['recall']:.3f}" if "precision" in result else "")
    label = "FID" if FLAGS.features == "inception" else "FD"
    print(f"step {step} {sampler_name} S={steps} N={num} [{net.name}]: {label} {result['fd']:.4g}  "
          f"KID {kid_mean:.4g} ± {kid_std:.2g}{pr}")
    with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
      f.write(json.dumps(result) + "\n")
  return 0
