"""Where the time of a U-Net forward pass or gradient goes on this backend, per XLA op.

    python benchmarks/profile_ops.py [--work=grad|forward] [--dtype=float32|bfloat16]
        [--conv_impl=auto|lax|dots] [--runs=3] [--top=25] [--out=runs/profile_ops]

Runs the CIFAR-10 U-Net of `_cifar_unet.py` (seeded random weights, batch 16) under
``jax.profiler.trace``, reads the trace back with xprof (``pip install xprof``; not a ddx
dependency) and joins each traced op with the compiled HLO. Prints the time per category
(convolutions, weight-gradient convolutions, dots, other fusions), the GFLOP/s of each
convolution and dot (FLOPs from the HLO shapes: 2 x output elements x window x input
features), and the slowest ops. Op times are summed over the runs' traced thunks and divided
by the number of runs; thunks can overlap on several cores, so they are shares of work, not
of wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _computations(hlo: str) -> tuple[dict, dict]:
  """({computation: [lines]}, {instruction: (computation, text after '= ')})."""
  comps: dict = {}
  cur = None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      comps[cur] = []
    elif cur:
      comps[cur].append(line)
  insts = {}
  for c, lines in comps.items():
    for line in lines:
      m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)$", line)
      if m:
        insts[m.group(1)] = (c, m.group(2))
  return comps, insts


def _dims(shape: str) -> list[int]:
  return [int(v) for v in re.match(r"\w+\[([\d,]*)\]", shape).group(1).split(",") if v]


def describe(name: str, comps: dict, insts: dict) -> tuple[str, float, str]:
  """(category, FLOPs, shapes) of the traced op ``name``: a convolution or dot, possibly
  inside a fusion, or another op."""

  def shape_of(operand: str) -> str:
    return re.match(r"(\w+\[[\d,]*\])", insts[operand.strip().lstrip("%")][1]).group(1)

  _, text = insts[name]
  called = re.search(r"calls=%([\w.\-]+)", text)
  body = comps.get(called.group(1), []) if called else ["= " + text]
  for line in body:
    if " convolution(" in line:
      m = re.search(r"= (\w+\[[\d,]*\])\S* convolution\(([^)]*)\).*dim_labels=([0-9a-z_>-]+)", line)
      out, labels = m.group(1), m.group(3)
      lhs, rhs = (shape_of(o) for o in m.group(2).split(", "))
      w = re.search(r"window=\{size=([0-9x]+)", line)
      window = int(np.prod([int(v) for v in w.group(1).split("x")])) if w else 1
      features = _dims(lhs)[labels.split("->")[0].split("_")[0].index("f")]
      flops = 2.0 * np.prod(_dims(out)) * window * features
      # XLA forms a weight gradient as a convolution whose window is the whole image and
      # whose contracted "features" are the batch
      kind = "convolution, weight gradient" if window > 9 and max(_dims(out)[1:3]) <= 3 else "convolution"
      return f"{kind} ({labels})", flops, f"{lhs} * {rhs} -> {out}" + (f" window {w.group(1)}" if w else "")
    if " dot(" in line:
      m = re.search(r"= (\w+\[[\d,]*\])\S* dot\(([^)]*)\).*lhs_contracting_dims=\{([\d,]*)\}", line)
      out = m.group(1)
      lhs, rhs = (shape_of(o) for o in m.group(2).split(", "))
      k = int(np.prod([_dims(lhs)[int(i)] for i in m.group(3).split(",")]))
      return "dot", 2.0 * np.prod(_dims(out)) * k, f"{lhs} . {rhs} -> {out}"
  op = re.match(r"\S+ ([\w\-]+)\(", text)
  return "other: " + (op.group(1) if op else "?"), 0.0, text[:90]


def op_times(trace_dir: str) -> collections.Counter:
  from xprof.convert import raw_to_tool_data

  planes = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  data, _ = raw_to_tool_data.xspace_to_tool_data(planes, "trace_viewer", {})
  try:
    data = gzip.decompress(data)
  except (OSError, TypeError):
    pass
  trace = json.loads(data)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      total[e["name"]] += e.get("dur", 0)
  return total


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--work", default="grad", choices=("grad", "forward"))
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--conv_impl", default="auto", choices=("auto", "lax", "dots"))
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--out", default=None, help="keep the trace and HLO here (default: a temporary directory)")
  args = ap.parse_args(argv)
  if args.runs < 1 or args.top < 0:
    raise SystemExit(f"--runs: must be >= 1 (got {args.runs}); --top >= 0 (got {args.top})")
  try:
    import xprof  # noqa: F401 -- only checks that it is installed
  except ImportError:
    raise SystemExit("profile_ops.py reads traces with xprof: pip install xprof") from None

  import _cifar_unet
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ddx.models import from_diffusers

  out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="ddx_profile_")
  os.makedirs(out, exist_ok=True)
  fixture = os.path.join(out, "fixture")
  if not os.path.exists(os.path.join(fixture, "inputs.npz")):
    _cifar_unet.write_fixture(fixture, 16)
  data = np.load(os.path.join(fixture, "inputs.npz"))
  model = from_diffusers(os.path.join(fixture, "unet"), dtype=args.dtype, conv_impl=args.conv_impl)
  graphdef, params = nnx.split(model)
  x = jnp.asarray(data["x"].transpose(0, 2, 3, 1))
  t = jnp.asarray(data["t"].astype(np.int32))

  def loss(p):
    return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t).astype(jnp.float32) - x))

  fn = jax.jit(jax.value_and_grad(loss)) if args.work == "grad" else jax.jit(lambda p: nnx.merge(graphdef, p)(x, t))
  compiled = fn.lower(params).compile()
  jax.block_until_ready(compiled(params))
  trace_dir = os.path.join(out, f"trace_{args.work}_{args.dtype}_{args.conv_impl}")
  shutil.rmtree(trace_dir, ignore_errors=True)  # one trace per directory: xprof reads them all
  with jax.profiler.trace(trace_dir):
    for _ in range(args.runs):
      jax.block_until_ready(compiled(params))
  comps, insts = _computations(compiled.as_text())

  per_cat: collections.Counter = collections.Counter()
  flops_cat: collections.Counter = collections.Counter()
  rows = []
  for name, us in op_times(trace_dir).items():
    if name not in insts:
      continue  # runtime bookkeeping, not an HLO op
    cat, flops, shapes = describe(name, comps, insts)
    key = cat if not cat.startswith("other") else "other ops (fusions, copies, reductions)"
    per_cat[key] += us / args.runs
    flops_cat[key] += flops
    rows.append((us / args.runs, cat, flops, shapes))
  total = sum(per_cat.values())
  print(
    f"{args.work}, {args.dtype}, conv_impl={args.conv_impl}, {jax.default_backend()}: "
    f"{total / 1e3:.0f} ms of traced op time per run"
  )
  print("| category | ms per run | share | GFLOP/s |\n|---|---|---|---|")
  for cat, us in per_cat.most_common():
    rate = f"{flops_cat[cat] / us / 1e3:.0f}" if flops_cat[cat] else "–"
    print(f"| {cat} | {us / 1e3:.1f} | {100 * us / total:.1f}% | {rate} |")
  if args.top:
    print(f"\nslowest {args.top} ops:")
    for us, cat, flops, shapes in sorted(rows, key=lambda r: -r[0])[: args.top]:
      rate = f"{flops / us / 1e3:6.0f} GFLOP/s" if flops else " " * 14
      print(f"{us / 1e3:8.1f} ms {rate}  {cat:28s} {shapes}")
  print(f"trace and fixture in {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
