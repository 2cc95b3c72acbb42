"""DDIM reconstruction error vs the number of steps, beside the DDIM paper's Table 2.

    python benchmarks/reconstruction_vs_steps.py --workdir=runs/digits [--num=128 --out=/tmp/recon]

Each image x0 is DDIM-inverted to x_T (ddx.edit.invert: eta 0, no clipping, eps at the target
level) and decoded again on the same grid of S steps; the error is the per-dimension MSE on the
[0, 1] scale, ``mean(((x_rec - x0) / 2)^2)``, for S in {10, 20, 50, 100, 200, 500, 1000}.
The paper reports CIFAR-10 (32x32x3) with its own model; the absolute numbers are not
comparable across data sets and models, the trend with S is.

Data: the digits source's images at the model's size. The embedded digits set has no held-out
split (its 1797 images are all training data), so unless the workdir's model was trained on
another data set these images were seen in training. Writes ``<out>.png`` (log-log plot) and
``<out>.json`` (the table).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained digits workdir (config.json + checkpoints/).")
flags.DEFINE_integer("num", 128, "Number of images (the first ones of a fixed permutation).")
flags.DEFINE_string("out", None, "Output prefix (default: /tmp/reconstruction_vs_steps).")
flags.DEFINE_string("steps", "10,20,50,100,200,500,1000", "Comma-separated S values.")
flags.DEFINE_integer("seed", 0, "Permutation seed for the images.")

PAPER = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}


def plot(path: str, rows: list[tuple[int, float, float | None]]) -> None:
  """A small log-log line plot (PIL only): ddx (blue) and the paper (orange) vs S."""
  import math

  from PIL import Image, ImageDraw

  w, h, m = 520, 360, 60
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  vals = [v for _, a, b in rows for v in (a, b) if v]
  ylo, yhi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
  xlo, xhi = math.log10(rows[0][0]), math.log10(rows[-1][0])
  X = lambda s: m + (math.log10(s) - xlo) / (xhi - xlo) * (w - 2 * m)
  Y = lambda v: h - m - (math.log10(v) - ylo) / max(yhi - ylo, 1e-9) * (h - 2 * m)
  d.rectangle([m, m, w - m, h - m], outline="black")
  for e in range(ylo, yhi + 1):
    d.line([m - 4, Y(10.0**e), m, Y(10.0**e)], fill="black")
    d.text((5, Y(10.0**e) - 6), f"1e{e}", fill="black")
  for s, _, _ in rows:
    d.line([X(s), h - m, X(s), h - m + 4], fill="black")
    d.text((X(s) - 10, h - m + 8), str(s), fill="black")
  d.text((w // 2 - 60, h - 25), "DDIM steps S (log)", fill="black")
  d.text((m, 20), "reconstruction MSE per dim, [0, 1] scale (log)", fill="black")
  for k, colour, label in ((1, (31, 119, 180), "ddx (digits)"), (2, (255, 127, 14), "DDIM paper Tab. 2 (CIFAR-10)")):
    pts = [(X(r[0]), Y(r[k])) for r in rows if r[k]]
    d.line(pts, fill=colour, width=2)
    for x, y in pts:
      d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    d.text((w - m - 190, m + 10 + 15 * (k - 1)), label, fill=colour)
  img.save(path)


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError("--workdir: required")
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  import jax
  import numpy as np

  import ddx
  from ddx import data, edit
  from ddx.cli import restore

  model, cfg, step = restore.load_model(FLAGS.workdir)
  size, ch = cfg["model"]["image_size"], cfg["model"]["in_channels"]
  src = data.make_source("digits", image_size=size)
  perm = np.random.default_rng(FLAGS.seed).permutation(len(src))[: FLAGS.num]
  x0 = np.stack([src[int(i)]["image"] for i in perm]).reshape(-1, size, size, ch)
  # class-conditional models are inverted and decoded with the null label
  model_fn = ddx.guidance.for_labels(model, cfg["model"].get("num_classes"), len(x0), None)
  rows = []
  print(
    f"workdir {FLAGS.workdir} (step {step}, EMA), {len(x0)} digits at {size}x{size}; "
    "per-dim MSE on [0, 1] (DDIM eta 0, no clipping)"
  )
  print(f"{'S':>5s} {'ddx':>10s} {'paper (CIFAR-10)':>17s} {'seconds':>8s}")
  for s in [int(v) for v in FLAGS.steps.split(",")]:
    _, sampler = restore.make_sampler(cfg, "ddim", s, eta=0.0, clip_sample=False)
    t0 = time.time()
    rec = np.asarray(jax.device_get(edit.reconstruct(model_fn, sampler, x0)))
    mse = float(np.mean(((rec - x0) / 2.0) ** 2))
    rows.append((s, mse, PAPER.get(s)))
    paper = f"{PAPER[s]:.4g}" if s in PAPER else "-"
    print(f"{s:5d} {mse:10.3g} {paper:>17s} {time.time() - t0:8.1f}", flush=True)
  out = FLAGS.out or "/tmp/reconstruction_vs_steps"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  plot(out + ".png", rows)
  with open(out + ".json", "w") as f:
    json.dump(
      {
        "workdir": os.path.abspath(FLAGS.workdir),
        "step": step,
        "num": len(x0),
        "rows": [{"S": s, "mse": m, "paper": p} for s, m, p in rows],
      },
      f,
      indent=1,
    )
  print(f"wrote {out}.png and {out}.json")


if __name__ == "__main__":
  app.run(main)
