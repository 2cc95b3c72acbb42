"""DDIM eta = 0 on a trained digits model: per-step x0 clipping with and without a consistent eps.

    python benchmarks/ddim_clipping.py --workdir=runs/digits [--num=512] [--steps=50,100,200,500]

For each setting and number of steps S it samples ``num`` images from the EMA weights (the same
x_T for every run) and prints the Fréchet distance to the real digits in the hidden-layer
features of a scikit-learn MLP digit classifier (fixed seed; the feature space of the issue
that motivated ddx's default), the share of the most frequent predicted digit (a collapse
shows as one digit taking most samples), and the share of pixels outside [-1, 1]. The floor is
the distance between two random halves of the real digits.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddx  # noqa: E402
from ddx import eval as ddx_eval  # noqa: E402
from ddx import guidance  # noqa: E402
from ddx.cli import config as config_lib
from ddx.cli import restore

SETTINGS = {
  "clip, eps re-derived (ddx default)": dict(clip_sample=True),
  "clip, model eps (diffusers default)": dict(clip_sample=True, use_clipped_model_output=False),
  "no clip": dict(clip_sample=False),
}


def _classifier(images: np.ndarray, labels: np.ndarray):
  from sklearn.neural_network import MLPClassifier

  clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0)
  clf.fit(images.reshape(len(images), -1), labels)
  return clf


def _features(clf, x: np.ndarray) -> np.ndarray:
  h = x.reshape(len(x), -1) @ clf.coefs_[0] + clf.intercepts_[0]
  return np.maximum(h, 0.0).astype(np.float64)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=512)
  p.add_argument("--steps", default="50,100,200,500")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  steps = [int(s) for s in args.steps.split(",")]

  model, cfg, step = restore.load_model(args.workdir)
  size = cfg["model"]["image_size"]
  real = ddx.data.make_source("digits", image_size=size)
  images, labels = np.asarray(real.images), np.asarray(real.labels)
  clf = _classifier(images, labels)
  real_feats = _features(clf, images)
  perm = np.random.default_rng(args.seed).permutation(len(images))
  half = len(images) // 2
  floor = ddx_eval.frechet_distance(real_feats[perm[:half]], real_feats[perm[half:]])
  print(
    f"workdir {args.workdir} (step {step}), {args.num} samples, features: MLP(64) hidden layer; "
    f"floor FD(real half, real half) = {floor:.2f}"
  )

  model_fn = guidance.conditional(model, None)
  x_T = jax.random.normal(jax.random.key(args.seed), (args.num, size, size, cfg["model"]["in_channels"]))
  print("| DDIM eta=0 | " + " | ".join(f"S={s}" for s in steps) + " |")
  print("|---|" + "---|" * len(steps))
  sched = ddx.schedules.make(**config_lib.schedule_kwargs(cfg["diffusion"]))
  for name, kw in SETTINGS.items():
    cells = []
    for s in steps:
      sampler = ddx.samplers.make("ddim", sched, s, prediction=cfg["diffusion"]["prediction"], **kw)
      x = np.asarray(ddx.sample(model_fn, sampler, x_T))
      if not np.isfinite(x).all():
        cells.append("non-finite")
        continue
      fd = ddx_eval.frechet_distance(_features(clf, np.clip(x, -1, 1)), real_feats)
      top = np.bincount(clf.predict(np.clip(x, -1, 1).reshape(len(x), -1)), minlength=10).max() / len(x)
      outside = float(np.mean(np.abs(x) > 1))
      cells.append(f"{fd:.2f} (top digit {top:.0%}, {outside:.0%} px outside)")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
