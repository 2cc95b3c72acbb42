"""Forward-pass benchmark: ddx UNet (JAX/XLA) vs diffusers UNet2DModel (PyTorch), same weights.

    python benchmarks/unet_forward.py [--threads=N] [--batch=16] [--runs=10] [--warmup=2]
        [--bf16] [--no-fast-conv] [--no-channels-last]

A random-initialised diffusers UNet2DModel with the google/ddpm-cifar10-32 config (35.7M
parameters) is saved as safetensors, converted with `ddx.models.from_diffusers`, and both
forward passes are timed on the same float32 inputs (batch 16, 32x32x3, random t). Each
implementation runs in its own subprocess so that peak memory (ru_maxrss) is separate:

* compile: ddx = trace + XLA compile of the jitted forward; torch = the first (eager) call.
* forward: median wall time of ``--runs`` calls after ``--warmup`` calls
  (``block_until_ready`` / ``torch.inference_mode``).
* peak RSS: the process high-water mark (libraries + weights + compile + forward);
  "RSS before" is the same right after the model was loaded. For ddx, XLA's own buffer
  estimate (``compiled.memory_analysis()``: temp + arguments + outputs) is also reported.

The outputs of all implementations are compared (max abs diff / max abs ref).

Rows: "ddx" (default XLA flags), "ddx ... Eigen conv" (``XLA_FLAGS=FAST_CONV_FLAGS``: XLA's
own Eigen convolutions instead of YNNPACK's), torch eager (NCHW) and torch channels_last.
On a shared machine torch's OpenMP threads slow down badly when other processes compete;
``--threads=1`` pins every worker to one CPU for a contention-robust per-core comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from _cifar_unet import write_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _pin(args) -> None:
  """Restrict this process to the first ``--threads`` CPUs (XLA sizes its pool from this)."""
  if args.threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])


def worker_ddx(args) -> dict:
  _pin(args)
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ddx.models import from_diffusers

  data = np.load(os.path.join(args.dir, "inputs.npz"))
  t0 = time.perf_counter()
  model = from_diffusers(os.path.join(args.dir, "unet"), dtype=args.dtype)
  graphdef, state = nnx.split(model)
  x = jnp.asarray(data["x"].transpose(0, 2, 3, 1))
  t = jnp.asarray(data["t"])
  jax.block_until_ready((state, x, t))
  load_s = time.perf_counter() - t0
  rss_before = _rss_mb()

  @jax.jit
  def forward(state, x, t):
    return nnx.merge(graphdef, state)(x, t)

  t0 = time.perf_counter()
  compiled = forward.lower(state, x, t).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  xla_mb = None
  if mem is not None:
    xla_mb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
  for _ in range(args.warmup):
    out = compiled(state, x, t).block_until_ready()
  times = []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    out = compiled(state, x, t).block_until_ready()
    times.append(time.perf_counter() - t0)
  np.save(os.path.join(args.dir, f"out_{args.worker}.npy"), np.asarray(out).transpose(0, 3, 1, 2))
  return dict(
    impl=f"ddx ({args.dtype or 'float32'})",
    threads=f"XLA, {len(os.sched_getaffinity(0))} cpus",
    load_s=load_s,
    compile_s=compile_s,
    times=times,
    rss_before=rss_before,
    rss_peak=_rss_mb(),
    xla_mb=xla_mb,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
  )


def worker_torch(args) -> dict:
  _pin(args)
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  from diffusers import UNet2DModel

  data = np.load(os.path.join(args.dir, "inputs.npz"))
  t0 = time.perf_counter()
  model = UNet2DModel.from_pretrained(os.path.join(args.dir, "unet"), use_safetensors=True).eval()
  x = torch.from_numpy(data["x"])
  t = torch.from_numpy(data["t"])
  channels_last = args.worker == "torch_cl"
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  load_s = time.perf_counter() - t0
  rss_before = _rss_mb()
  with torch.inference_mode():
    t0 = time.perf_counter()
    out = model(x, t).sample
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      out = model(x, t).sample
    times = []
    for _ in range(args.runs):
      t0 = time.perf_counter()
      out = model(x, t).sample
      times.append(time.perf_counter() - t0)
  np.save(os.path.join(args.dir, f"out_{args.worker}.npy"), out.contiguous().numpy())
  name = "torch eager" + (" channels_last" if channels_last else "")
  return dict(
    impl=name,
    threads=f"torch {torch.get_num_threads()} threads",
    load_s=load_s,
    compile_s=first_s,
    times=times,
    rss_before=rss_before,
    rss_peak=_rss_mb(),
    xla_mb=None,
  )


# XLA:CPU sends convolutions to YNNPACK by default; its kernels measured ~20% slower than
# XLA's Eigen convolutions for these shapes on this machine (AVX-512 Xeon, 2 cores).
FAST_CONV_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def run_worker(args, worker: str, extra=(), xla_flags: str | None = None) -> dict:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    f"--worker={worker}",
    f"--dir={args.dir}",
    f"--runs={args.runs}",
    f"--warmup={args.warmup}",
    f"--threads={args.threads}",
    *extra,
  ]
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  if xla_flags is not None:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{worker} worker failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no-channels-last", action="store_true", help="skip the torch channels_last variant")
  p.add_argument("--no-fast-conv", action="store_true", help=f"skip the ddx row with XLA_FLAGS={FAST_CONV_FLAGS}")
  p.add_argument("--bf16", action="store_true", help="also time ddx with bfloat16 compute")
  p.add_argument(
    "--threads", type=int, default=0, help="pin each worker to this many CPUs (torch.set_num_threads too); 0 = all"
  )
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    fn = worker_ddx if args.worker.startswith("ddx") else worker_torch
    print(json.dumps(fn(args)))
    return

  with tempfile.TemporaryDirectory() as d:
    args.dir = d
    n_params = write_fixture(d, args.batch)

    rows = [run_worker(args, "ddx")]
    workers = ["ddx"]
    if not args.no_fast_conv:
      rows.append(run_worker(args, "ddx_eigen", xla_flags=FAST_CONV_FLAGS))
      rows[-1]["impl"] += " Eigen conv"
      workers.append("ddx_eigen")
    if args.bf16:
      rows.append(run_worker(args, "ddx_bf16", ["--dtype=bfloat16"]))
      workers.append("ddx_bf16")
    rows.append(run_worker(args, "torch"))
    workers.append("torch")
    if not args.no_channels_last:
      rows.append(run_worker(args, "torch_cl"))
      workers.append("torch_cl")
    ref = np.load(os.path.join(d, "out_torch.npy"))
    for row, w in zip(rows, workers):
      out = np.load(os.path.join(d, f"out_{w}.npy"))
      row["rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())

  print(
    f"UNet forward, google/ddpm-cifar10-32 config ({n_params:,} params), batch {args.batch}, "
    f"32x32x3, float32 weights; median of {args.runs} runs after {args.warmup} warm-up; "
    f"{os.cpu_count()} CPUs"
  )
  hdr = (
    f"{'impl':28s} {'threads':18s} {'load s':>7s} {'compile s':>10s} {'fwd ms':>9s} "
    f"{'min-max ms':>15s} {'RSS before MB':>14s} {'peak RSS MB':>12s} {'XLA buf MB':>11s} "
    f"{'rel err':>8s}"
  )
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    med = statistics.median(r["times"]) * 1e3
    r["median_ms"] = med
    rng_s = f"{min(r['times']) * 1e3:.0f}-{max(r['times']) * 1e3:.0f}"
    xla = f"{r['xla_mb']:.0f}" if r["xla_mb"] is not None else "-"
    print(
      f"{r['impl']:28s} {r['threads']:18s} {r['load_s']:7.2f} {r['compile_s']:10.2f} "
      f"{med:9.1f} {rng_s:>15s} {r['rss_before']:14.0f} {r['rss_peak']:12.0f} {xla:>11s} "
      f"{r['rel_err']:8.1e}"
    )
  print("(torch 'compile s' is its first eager call; rel err = max|out - torch| / max|torch|)")
  for ddx in rows:
    if not ddx["impl"].startswith("ddx"):
      continue
    for r in rows:
      if r["impl"].startswith("torch"):
        print(
          f"ratio {ddx['impl']} / {r['impl']}: median "
          f"{ddx['median_ms'] / r['median_ms']:.2f}, min {min(ddx['times']) / min(r['times']):.2f}"
          "  (< 1: ddx faster)"
        )
  if not args.no_fast_conv:
    print(f"'Eigen conv' rows: XLA_FLAGS={FAST_CONV_FLAGS} (YNNPACK convolutions off)")
  load = os.getloadavg()[0]
  if load > os.cpu_count() * 0.75:
    print(
      f"WARNING: load average {load:.1f} on {os.cpu_count()} CPUs: other processes compete; "
      "torch's OpenMP threads suffer most (compare the min times, or use --threads=1)"
    )
  if rows[0].get("xla_flags"):
    print(f"XLA_FLAGS (all ddx rows)={rows[0]['xla_flags']}")


if __name__ == "__main__":
  main()
