"""The sampler lab on exact data: how far each sampler's output distribution is from the true
data distribution, against the number of steps S, when the model is the *exact* eps.

    python benchmarks/sampler_convergence.py [--num=100000] [--out=runs/sampler_convergence]

Data: a 2-D mixture of three well-separated isotropic Gaussians (weights 0.5 / 0.3 / 0.2,
stds 0.10 / 0.07 / 0.04, means >= 1.0 apart, i.e. >= 7 summed stds), inside [-1, 1] like images.
The model is the closed-form posterior-mean eps of that mixture (tests/_closed_form.py), so
every error below is the sampler's (discretisation, plus the schedule's non-zero terminal
SNR: x_T ~ N(0, I) is not exactly q(x_T)), not a network's.

Distance (Monte Carlo, N samples, shared x_T and noise across samplers): each sample is
assigned to the component of highest posterior probability under the true mixture; then

    W = sqrt( sum_k w_k FD(N(m_k, C_k), N(mu_k, s_k^2 I)) )

with m_k, C_k the mean and covariance of the samples assigned to component k and FD the
closed-form Fréchet distance (ddx.eval.frechet_distance_from_stats). FD between Gaussians is
the squared 2-Wasserstein distance, so W is a W2-like length and its slope against S is the
order of convergence in distribution. ``TV`` is the weight error 1/2 sum_k |n_k/N - w_k|.
The same W of N exact draws from the mixture is the Monte Carlo floor, printed first;
orders are fitted (least squares in log-log) over the S where W > 3 x floor.

Samplers: ddpm (fixed_large = the DDIM paper's sigma-hat row, fixed_small), ddim eta = 0 and
1, plms, dpm_solver++ (2M), all on the trailing grid (it starts at t = T-1 for every S; S
divides T), no clipping, final alpha 1. Writes <out>/sampler_convergence.md and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ddx  # noqa: E402
from ddx.eval import frechet_distance_from_stats  # noqa: E402
from tests._closed_form import Mixture  # noqa: E402

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-0.5, -0.3], [0.4, 0.5], [0.5, -0.5]])
STDS = np.array([0.10, 0.07, 0.04])
STEPS = (5, 10, 20, 50, 100, 200, 500, 1000)

SAMPLERS = {
  "ddpm fixed_large": ("ddpm", dict(variance="fixed_large", clip_sample=False)),
  "ddpm fixed_small": ("ddpm", dict(variance="fixed_small", clip_sample=False)),
  "ddim eta=0": ("ddim", dict(eta=0.0, clip_sample=False, set_alpha_to_one=True)),
  "ddim eta=1": ("ddim", dict(eta=1.0, clip_sample=False, set_alpha_to_one=True)),
  "plms": ("plms", dict(set_alpha_to_one=True)),
  "dpm_solver++": ("dpm_solver++", dict()),
}


def assign(x: np.ndarray) -> np.ndarray:
  """Component of highest posterior probability under the true mixture, [N] int."""
  d2 = ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)
  logp = np.log(WEIGHTS)[None] - d2 / (2 * STDS**2)[None] - MEANS.shape[1] * np.log(STDS)[None]
  return np.argmax(logp, axis=1)


def distance(x: np.ndarray) -> tuple[float, float]:
  """(W, TV) of samples x [N, 2] against the mixture (see the module docstring)."""
  x = np.asarray(x, np.float64)
  k = assign(x)
  total, tv = 0.0, 0.0
  for j, (w, mu, s) in enumerate(zip(WEIGHTS, MEANS, STDS)):
    xj = x[k == j]
    tv += 0.5 * abs(len(xj) / len(x) - w)
    if len(xj) < 3:
      return float("inf"), tv
    fd = frechet_distance_from_stats(xj.mean(0), np.cov(xj, rowvar=False), mu, s**2 * np.eye(2))
    total += w * fd
  return float(np.sqrt(total)), tv


def exact_draws(key, n: int) -> np.ndarray:
  kc, kx = jax.random.split(key)
  comp = np.asarray(jax.random.choice(kc, len(WEIGHTS), (n,), p=jnp.asarray(WEIGHTS)))
  z = np.asarray(jax.random.normal(kx, (n, 2)), np.float64)
  return MEANS[comp] + STDS[comp, None] * z


def fit_order(steps, errs, floor) -> float:
  pts = [(s, e) for s, e in zip(steps, errs) if np.isfinite(e) and e > 3 * floor]
  if len(pts) < 2:
    return float("nan")
  s, e = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(-np.polyfit(s, e, 1)[0])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num", type=int, default=100_000, help="samples per (sampler, S)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="runs/sampler_convergence")
  args = ap.parse_args()
  if args.num < 1000:
    raise SystemExit("--num: need at least 1000 samples, got %d" % args.num)

  sched = ddx.schedules.make("linear", 1000)
  model = Mixture(sched, WEIGHTS, MEANS, STDS)
  key = jax.random.key(args.seed)
  x_T = jax.random.normal(jax.random.fold_in(key, 0), (args.num, 2), jnp.float32)
  noise_key = jax.random.fold_in(key, 1)
  floor, floor_tv = distance(exact_draws(jax.random.fold_in(key, 2), args.num))
  print(f"N = {args.num}; Monte Carlo floor (exact draws): W = {floor:.2e}, TV = {floor_tv:.2e}", flush=True)

  results = {}
  t0 = time.time()
  for label, (name, kw) in SAMPLERS.items():
    results[label] = []
    for S in STEPS:
      smp = ddx.samplers.make(name, sched, S, spacing="trailing", **kw)
      x = np.asarray(ddx.sample(model.eps, smp, x_T, noise_key if smp.stochastic else None))
      w, tv = distance(x)
      results[label].append((w, tv))
      print(f"  {label:17s} S={S:5d}  W={w:.3e}  TV={tv:.3e}   ({time.time() - t0:.0f} s)", flush=True)

  head = "| sampler | " + " | ".join(f"S={s}" for s in STEPS) + " | order |"
  lines = [
    f"W (W2-like distance to the true mixture; Monte Carlo floor {floor:.1e} at N = {args.num}):",
    "",
    head,
    "|" + "---|" * (len(STEPS) + 2),
  ]
  for label, rows in results.items():
    errs = [w for w, _ in rows]
    lines.append(f"| {label} | " + " | ".join(f"{w:.2e}" for w in errs) + f" | {fit_order(STEPS, errs, floor):.2f} |")
  lines += [
    "",
    f"TV (component-weight error; floor {floor_tv:.1e}):",
    "",
    head.replace(" order |", ""),
    "|" + "---|" * (len(STEPS) + 1),
  ]
  for label, rows in results.items():
    lines.append(f"| {label} | " + " | ".join(f"{tv:.2e}" for _, tv in rows) + " |")
  table = "\n".join(lines)
  print("\n" + table)

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sampler_convergence.md"), "w") as f:
    f.write(table + "\n")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
  for label, rows in results.items():
    errs = [w for w, _ in rows]
    ax.loglog(STEPS, errs, "o-", label=f"{label} (order {fit_order(STEPS, errs, floor):.2f})")
  ax.axhline(floor, color="grey", ls="--", lw=1, label=f"Monte Carlo floor (N={args.num})")
  ax.set_xlabel("sampling steps S")
  ax.set_ylabel("W: per-component Fréchet (W2) to the true mixture")
  ax.set_title("ddx samplers with the exact eps of a 2-D Gaussian mixture")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  png = os.path.join(args.out, "sampler_convergence.png")
  fig.savefig(png)
  print(f"wrote {png} and sampler_convergence.md")


if __name__ == "__main__":
  main()
