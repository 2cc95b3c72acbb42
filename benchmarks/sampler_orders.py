"""The sampler lab's order table: how fast each deterministic sampler's *path* converges to the
exact probability-flow ODE solution, with the exact eps of a 2-D Gaussian mixture.

    python benchmarks/sampler_orders.py [--num=20000] [--out=runs/sampler_orders]

benchmarks/sampler_convergence.py measures distances between sample *distributions*, whose
fitted orders are all about 1: every run there ends with a jump from the last grid point to
alpha 1, a first-order error whatever the solver. Here every sampler starts from the same x_T
at t = T - 1 and stops at the level of t = 0 (σ = 0.01 on the linear schedule): DDIM and PLMS
with ``set_alpha_to_one=False``, the multistep and σ-space solvers with ``final_sigma=
"sigma_min"`` and no lower-order final step. The error is the RMS distance of the samples
(in the variance-preserving scale) to a reference solution of the same ODE from the same x_T
(UniPC-3 with S = 1000 on a Karras grid, itself checked against S = 500), and the order the
least-squares slope of log error on log S over the last three S of 10..640 whose error is
above 10x the reference's (model calls: 2S - 1 for Heun).
The mixture is that of sampler_convergence.py (weights 0.5 / 0.3 / 0.2, stds 0.10 / 0.07 /
0.04). Writes <out>/sampler_orders.md and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ddx  # noqa: E402
from tests._closed_form import Mixture  # noqa: E402

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-0.5, -0.3], [0.4, 0.5], [0.5, -0.5]])
STDS = np.array([0.30, 0.21, 0.12])
# divisors of T = 1000: uniform integer grids (PLMS's Adams-Bashforth weights assume equal steps)
STEPS = (10, 20, 40, 100, 200, 500)
END = dict(final_sigma="sigma_min")

# label -> (name, kwargs, theoretical order)
SAMPLERS = {
  "ddim (η = 0)": ("ddim", dict(spacing="trailing", set_alpha_to_one=False, clip_sample=False), 1),
  "plms": ("plms", dict(spacing="trailing", set_alpha_to_one=False), 4),
  "dpm_solver++ 2M": ("dpm_solver++", dict(**END, lower_order_final=False), 2),
  "dpm_solver++ 3M": ("dpm_solver++", dict(**END, solver_order=3, lower_order_final=False), 3),
  "dpm_solver++ 2M, Karras": ("dpm_solver++", dict(**END, lower_order_final=False, sigmas="karras"), 2),
  "unipc 2 (bh2)": ("unipc", dict(**END, lower_order_final=False), 3),
  "unipc 3 (bh2)": ("unipc", dict(**END, solver_order=3, lower_order_final=False), 4),
  "euler": ("euler", dict(**END), 1),
  "euler, Karras": ("euler", dict(**END, sigmas="karras"), 1),
  "heun, Karras": ("heun", dict(**END, sigmas="karras"), 2),
  "lms, Karras": ("lms", dict(**END, sigmas="karras"), 4),
}


def vp(sampler, x: np.ndarray) -> np.ndarray:
  """A σ-space sampler's output x_σ in the variance-preserving scale (the others as they are)."""
  if isinstance(sampler, ddx.samplers.sigmas.SigmaCommon):
    return x / np.sqrt(1.0 + SIGMA_END**2)
  return x


SIGMA_END = 0.0  # set in main: σ of t = 0


def fit_order(steps, errs, floor) -> float:
  """Slope of log error on log S over the last three S whose error is above 10x the
  reference's (the asymptotic range: at few steps the sharp components make every solver
  pre-asymptotic)."""
  pts = [(s, e) for s, e in zip(steps, errs) if e > 10 * floor][-3:]
  if len(pts) < 2:
    return float("nan")
  return float(-np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def main():
  global SIGMA_END
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num", type=int, default=20_000, help="samples")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="runs/sampler_orders")
  args = ap.parse_args()
  if args.num < 100:
    raise SystemExit(f"--num: need at least 100 samples, got {args.num}")
  sched = ddx.schedules.make("linear", 1000)
  ab0 = float(sched.f64.alphas_cumprod[0])
  SIGMA_END = np.sqrt((1.0 - ab0) / ab0)
  model = Mixture(sched, WEIGHTS, MEANS, STDS)
  x_T = jax.random.normal(jax.random.key(args.seed), (args.num, 2), jax.numpy.float32)
  t0 = time.time()
  refs = []
  for S in (500, 1000):
    smp = ddx.samplers.make("unipc", sched, S, solver_order=3, sigmas="karras", lower_order_final=False, **END)
    refs.append(np.asarray(ddx.sample(model.eps, smp, x_T), np.float64))
  ref = refs[1]
  ref_err = float(np.sqrt(np.mean(np.sum((refs[0] - ref) ** 2, axis=1))))
  print(f"N = {args.num}; reference UniPC-3 S=1000 vs S=500: RMS {ref_err:.1e} ({time.time() - t0:.0f} s)", flush=True)
  results = {}
  for label, (name, kw, _) in SAMPLERS.items():
    errs = []
    for S in STEPS:
      smp = ddx.samplers.make(name, sched, S, **kw)
      x = vp(smp, np.asarray(ddx.sample(model.eps, smp, x_T), np.float64))
      errs.append(float(np.sqrt(np.mean(np.sum((x - ref) ** 2, axis=1)))))
      print(f"  {label:24s} S={S:4d}  RMS={errs[-1]:.3e}   ({time.time() - t0:.0f} s)", flush=True)
    results[label] = errs

  lines = [
    f"RMS path error to the exact ODE solution at σ(t=0) (reference error {ref_err:.0e}; N = {args.num}):",
    "",
    "| sampler | " + " | ".join(f"S={s}" for s in STEPS) + " | fitted order | method order |",
    "|" + "---|" * (len(STEPS) + 3),
  ]
  for label, errs in results.items():
    cells = " | ".join(f"{e:.2e}" for e in errs)
    lines.append(f"| {label} | {cells} | {fit_order(STEPS, errs, ref_err):.2f} | {SAMPLERS[label][2]} |")
  table = "\n".join(lines)
  print("\n" + table)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sampler_orders.md"), "w") as f:
    f.write(table + "\n")
  import matplotlib  # noqa: PLC0415 -- only for the plot

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
  colors = plt.cm.tab20(np.linspace(0, 1, len(results)))
  for (label, errs), color, marker in zip(results.items(), colors, "osD^vPX*<>ph"):
    ax.loglog(STEPS, errs, "-", marker=marker, color=color, label=f"{label} ({fit_order(STEPS, errs, ref_err):.2f})")
  ax.set_xlabel("steps S")
  ax.set_ylabel("RMS distance to the exact ODE solution")
  ax.set_title("path error with the exact eps of a 2-D Gaussian mixture")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = os.path.join(args.out, "sampler_orders.png")
  fig.savefig(png)
  print(f"wrote {png} and sampler_orders.md")


if __name__ == "__main__":
  main()
