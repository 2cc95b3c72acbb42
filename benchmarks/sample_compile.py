"""Compile time of ddx.sample vs the number of steps (the scan body is traced once).

    python benchmarks/sample_compile.py

Prints, per sampler, the first-call time (trace + compile + run) and the steady-state run
time at N = 10 and N = 1000 steps, for a small MLP-sized model on this machine, and the
compile-time ratio N=1000 / N=10.
"""

import time

import jax
import jax.numpy as jnp

import ddx


def main():
  sched = ddx.schedules.make("linear", 1000)
  k1, k2 = jax.random.split(jax.random.key(0))
  w1 = jax.random.normal(k1, (64, 256)) / 8
  w2 = jax.random.normal(k2, (256, 64)) / 16
  model = jax.tree_util.Partial(lambda w1, w2, x, t: jnp.tanh(x @ w1 + t[:, None] / 1000.0) @ w2, w1, w2)
  x_T = jax.random.normal(jax.random.key(1), (32, 64))
  print(f"{'sampler':14s} {'N':>5s} {'compile+first (s)':>18s} {'run (s)':>9s}")
  for name in ("ddpm", "ddim", "plms", "dpm_solver++"):
    compiles = {}
    for n in (10, 999 if name == "dpm_solver++" else 1000):
      smp = ddx.samplers.make(name, sched, n)
      jax.clear_caches()
      t0 = time.perf_counter()
      jax.block_until_ready(ddx.sample(model, smp, x_T, jax.random.key(2)))
      first = time.perf_counter() - t0
      t0 = time.perf_counter()
      jax.block_until_ready(ddx.sample(model, smp, x_T, jax.random.key(2)))
      run = time.perf_counter() - t0
      compiles[n] = first - run
      print(f"{name:14s} {n:5d} {first:18.3f} {run:9.4f}")
    lo, hi = sorted(compiles)
    print(f"{name:14s} compile-time ratio N={hi}/N={lo}: {compiles[hi] / compiles[lo]:.2f}")


if __name__ == "__main__":
  main()
