"""Go/no-go for Winograd F(2x2, 3x3) convolutions on the CPU: per shape of the CIFAR-10 U-Net.

    python benchmarks/winograd_go_no_go.py [--runs=15] [--batch=16] [--json=FILE]

Winograd's minimal filtering computes each 2x2 output tile of a 3x3 convolution with 16
multiplies instead of 36: an input transform (B^T d B of every overlapping 4x4 input tile),
16 batched matrix products [tiles, C_in] x [C_in, C_out] (one per position of the 4x4
transformed tile), and an output transform (A^T m A), plus the filter transform G g G^T
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). Here the
transforms are strided slices and adds that XLA fuses, the products are one `dot_general`,
and the gradients are autodiff through all of it (the transposed transforms around the
transposed products: the same 2.25x fewer multiplies).

The shapes are every 3x3 stride-1 convolution of the ddx U-Net with the CIFAR-10 config
(configs/cifar10.py, 35.7M parameters) at batch 16, read from its jaxpr; each shape is measured
in its own process: forward, gradient w.r.t. the input and gradient w.r.t. the kernel, each
jitted for `lax.conv_general_dilated` and for Winograd, timed alternately (lax, winograd,
lax, ...) and summarised by medians. Accuracy: relative L2 error of Winograd against
`lax.conv` in float32, and of each against a float64 NumPy reference of the forward.

Decision rule (fixed before measuring): **go** if the shapes that carry most of the step's
3x3 convolution time (by lax time x count, the smallest set covering 80%) each run >= 1.3x
faster (forward + both gradients) with relative error <= 1e-5; otherwise no-go.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GO_SPEEDUP, GO_ERROR, DOMINANT_SHARE = 1.3, 1e-5, 0.8
PASSES = ("forward", "grad_input", "grad_kernel")

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A for a 4x4 input tile d and a 3x3 filter g.
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def _rows4(a, axis: int, tiles: int):
  """The 4 strided views a[k + 2i] (i < tiles) along ``axis``, k = 0..3."""
  import jax  # noqa: PLC0415 -- workers import JAX; the driver never does

  return [jax.lax.slice_in_dim(a, k, k + 2 * tiles - 1, stride=2, axis=axis) for k in range(4)]


def _bt(r):
  """B^T applied along the 4 views: d0 - d2, d1 + d2, d2 - d1, d1 - d3."""
  return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]


def winograd_conv(x, w, padding=((1, 1), (1, 1))):
  """Cross-correlation of ``x`` [N, H, W, C] with ``w`` [3, 3, C, O] (NHWC / HWIO, stride 1,
  explicit ``padding``) by Winograd F(2x2, 3x3); same values as ``lax.conv_general_dilated``
  up to rounding. Returns [N, H', W', O] in ``x``'s dtype."""
  import jax.numpy as jnp  # noqa: PLC0415 -- see _rows4

  (pt, pb), (pl, pr) = padding
  n, h, wd, c = x.shape
  o = w.shape[-1]
  oh, ow = h + pt + pb - 2, wd + pl + pr - 2
  th, tw = -(-oh // 2), -(-ow // 2)
  x = jnp.pad(x, ((0, 0), (pt, 2 * th + 2 - h - pt), (pl, 2 * tw + 2 - wd - pl), (0, 0)))
  tiles = []
  for rows in _bt(_rows4(x, 1, th)):
    tiles += _bt(_rows4(rows, 2, tw))
  v = jnp.stack(tiles).reshape(16, n * th * tw, c)  # B^T d B, position-major
  g = jnp.asarray(_G, w.dtype)
  u = jnp.einsum("ai,ijco,bj->abco", g, w, g).reshape(16, c, o)  # G g G^T
  m = jnp.einsum("kpc,kco->kpo", v, u).reshape(4, 4, n, th, tw, o)
  out = []
  for a in (m[0] + m[1] + m[2], m[1] - m[2] - m[3]):  # A^T along rows, then columns
    out.append(jnp.stack([a[0] + a[1] + a[2], a[1] - a[2] - a[3]], axis=3))  # [n, th, tw, 2, o]
  y = jnp.stack(out, axis=2).reshape(n, 2 * th, 2 * tw, o)
  return y[:, :oh, :ow]


def lax_conv(x, w, padding=((1, 1), (1, 1))):
  import jax  # noqa: PLC0415 -- see _rows4

  return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


# --- the shapes -----------------------------------------------------------------------------


def unet_shapes(batch: int) -> list[dict]:
  """Every 3x3 stride-1 convolution of the CIFAR-10 U-Net's forward: [{h, w, cin, cout, count}]."""
  sys.path.insert(0, REPO)
  import jax  # noqa: PLC0415 -- see _rows4
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from configs import cifar10  # noqa: PLC0415 -- configs/ is on sys.path only now
  from ddx.cli import config as config_lib  # noqa: PLC0415
  from ddx.models import UNetConfig, abstract  # noqa: PLC0415

  cfg = UNetConfig.from_json(config_lib.validate(cifar10.get_config())["model"]).replace(conv_impl="lax")
  graphdef, params = nnx.split(abstract(cfg))
  size, ch = cfg.image_size, cfg.in_channels

  def fwd(params, x, t):
    return nnx.merge(graphdef, params)(x, t)

  jaxpr = jax.make_jaxpr(fwd)(params, jnp.zeros((batch, size, size, ch)), jnp.zeros((batch,), jnp.int32))
  found = collections.Counter()

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
        if rhs[:2] == (3, 3) and tuple(eqn.params["window_strides"]) == (1, 1):
          found[(lhs[1], lhs[2], rhs[2], rhs[3])] += 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jaxpr.jaxpr)
  return [dict(h=h, w=w, cin=ci, cout=co, count=n) for (h, w, ci, co), n in sorted(found.items())]


# --- one shape, in a worker process ---------------------------------------------------------


def _reference(x, w):
  """Float64 cross-correlation with padding 1 (NumPy): 9 shifted products."""
  x, w = x.astype(np.float64), w.astype(np.float64)
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = np.zeros((n, h, wd, w.shape[-1]))
  for i in range(3):
    for j in range(3):
      y += xp[:, i : i + h, j : j + wd, :] @ w[i, j]
  return y


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def worker(shape: dict, batch: int, runs: int) -> dict:
  import jax  # noqa: PLC0415 -- see _rows4

  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, shape["h"], shape["w"], shape["cin"])).astype(np.float32)
  w = (rng.standard_normal((3, 3, shape["cin"], shape["cout"])) / np.sqrt(9 * shape["cin"])).astype(np.float32)
  g = rng.standard_normal((batch, shape["h"], shape["w"], shape["cout"])).astype(np.float32)
  x, w, g = jax.device_put(x), jax.device_put(w), jax.device_put(g)
  fns = {}
  for name, conv in (("lax", lax_conv), ("winograd", winograd_conv)):
    fns[name, "forward"] = jax.jit(conv)
    fns[name, "grad_input"] = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    fns[name, "grad_kernel"] = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  outs = {}
  for (name, what), fn in fns.items():
    args = (x, w) if what == "forward" else (x, w, g)
    outs[name, what] = np.asarray(jax.block_until_ready(fn(*args)))  # compile + warm up
  times = collections.defaultdict(list)
  for _ in range(runs):
    for what in ("forward", "grad_input", "grad_kernel"):
      for name in ("lax", "winograd"):
        args = (x, w) if what == "forward" else (x, w, g)
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name, what](*args))
        times[f"{name}/{what}"].append(time.perf_counter() - t0)
  ref = _reference(np.asarray(x), np.asarray(w))
  return dict(
    shape,
    ms={k: 1e3 * statistics.median(v) for k, v in times.items()},
    rel_err={what: _rel(outs["winograd", what], outs["lax", what]) for what in PASSES},
    fwd_err_vs_f64={name: _rel(outs[name, "forward"], ref) for name in ("lax", "winograd")},
  )


# --- the driver -----------------------------------------------------------------------------


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--runs", type=int, default=15, help="timed calls per implementation and pass")
  p.add_argument("--json", default=None, help="also write the rows to this file")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--list-shapes", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.list_shapes:
    print(json.dumps(unet_shapes(args.batch)))
    return
  if args.worker:
    sys.path.insert(0, REPO)
    print(json.dumps(worker(json.loads(args.worker), args.batch, args.runs)))
    return

  from _processor import describe  # noqa: PLC0415 -- benchmarks/ is the script's directory

  env = dict(os.environ, JAX_PLATFORMS="cpu", DDX_COMPILATION_CACHE="off")
  listing = subprocess.run(
    [sys.executable, __file__, "--list-shapes", f"--batch={args.batch}"], env=env, capture_output=True, text=True
  )
  if listing.returncode != 0:
    sys.exit(f"reading the U-Net's shapes failed:\n{listing.stderr[-3000:]}")
  shapes = json.loads(listing.stdout)
  print(f"processor: {describe()}; load average {os.getloadavg()[0]:.1f}")
  print(
    f"CIFAR-10 U-Net, batch {args.batch}: {sum(s['count'] for s in shapes)} 3x3 stride-1 convolutions "
    f"in {len(shapes)} shapes; float32; median of {args.runs} alternating runs, each shape in its own process"
  )
  rows = []
  for s in shapes:
    out = subprocess.run(
      [sys.executable, __file__, f"--worker={json.dumps(s)}", f"--batch={args.batch}", f"--runs={args.runs}"],
      env=env,
      capture_output=True,
      text=True,
    )
    if out.returncode != 0:
      sys.exit(f"worker for {s} failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"  measured {r['h']}x{r['w']} {r['cin']}->{r['cout']} (x{r['count']})", flush=True)

  passes = PASSES
  for r in rows:
    r["lax_ms"] = sum(r["ms"][f"lax/{p_}"] for p_ in passes)
    r["winograd_ms"] = sum(r["ms"][f"winograd/{p_}"] for p_ in passes)
    r["speedup"] = r["lax_ms"] / r["winograd_ms"]
    r["weight"] = r["lax_ms"] * r["count"]
    r["max_rel_err"] = max(r["rel_err"].values())
  total = sum(r["weight"] for r in rows)
  dominant, covered = [], 0.0
  for r in sorted(rows, key=lambda r: -r["weight"]):
    if covered >= DOMINANT_SHARE * total:
      break
    dominant.append(r)
    covered += r["weight"]
  for r in rows:
    r["dominant"] = r in dominant

  print(
    f"\n{'shape (HxW cin->cout)':24s} {'n':>3s} {'share':>6s} | {'fwd lax/wg ms':>15s} {'dx lax/wg ms':>15s}"
    f" {'dw lax/wg ms':>15s} | {'speedup':>7s} | {'rel err fwd/dx/dw':>26s} | {'fwd err vs f64 lax/wg':>22s}"
  )
  for r in rows:
    ms = r["ms"]
    cells = " ".join(f"{ms[f'lax/{p_}']:7.2f}/{ms[f'winograd/{p_}']:<7.2f}" for p_ in passes)
    err = "/".join(f"{r['rel_err'][p_]:.1e}" for p_ in passes)
    f64 = "/".join(f"{r['fwd_err_vs_f64'][k]:.1e}" for k in ("lax", "winograd"))
    mark = "*" if r["dominant"] else " "
    print(
      f"{mark}{r['h']:>3d}x{r['w']:<3d} {r['cin']:>4d}->{r['cout']:<4d}        {r['count']:>3d} "
      f"{100 * r['weight'] / total:5.1f}% | {cells} | {r['speedup']:6.2f}x | {err:>26s} | {f64:>22s}"
    )
  all_lax = sum(r["lax_ms"] * r["count"] for r in rows)
  all_wg = sum(min(r["lax_ms"], r["winograd_ms"]) * r["count"] for r in rows)
  print(f"* = dominant: the fewest shapes carrying >= {DOMINANT_SHARE:.0%} of the 3x3 convolution time")
  print(
    f"all 3x3 convolutions of one forward + backward: lax {all_lax:.0f} ms, winograd where faster {all_wg:.0f} ms "
    f"({all_lax / all_wg:.2f}x)"
  )
  go = all(r["speedup"] >= GO_SPEEDUP and r["max_rel_err"] <= GO_ERROR for r in dominant)
  print(
    f"decision: {'GO' if go else 'NO-GO'} (rule: every dominant shape >= {GO_SPEEDUP}x with relative error "
    f"<= {GO_ERROR:.0e})"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(processor=describe(), batch=args.batch, runs=args.runs, rows=rows, go=go), f, indent=1)


if __name__ == "__main__":
  main()
