"""Conformance table: ddx samplers vs diffusers' schedulers over the knob grid of
tests/oracle/test_conformance.py (same cases, same model, same injected noise).

    python benchmarks/conformance_table.py          # one row per sampler x knob group
    python benchmarks/conformance_table.py --full   # one row per case

Errors are ``max|ddx - ref| / max|ref|``, maximised over every sample of the trajectory and
over ddx's jitted ``ddx.sample`` output. "f32 ref" is stock diffusers (float32 schedules and
arithmetic); "f64 ref" is the same diffusers step code evaluated in float64 on exact alphas
(not available for DPMSolverMultistep, which casts to float32 inside step()).
Needs torch + diffusers.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import torch  # noqa: E402

from tests import _oracle_models as om  # noqa: E402


def _err(res):
  return max(res["final"], res["traj"])


def _rows():
  """(sampler, group, case id, reference, f32 err, f64 err or None, tol)."""
  key = jax.random.key(1)
  for kind, group, case, tol in om.CASES:
    res = om.measure(kind, case, f64=kind in om.HAS_F64)
    yield (
      kind,
      group,
      om.case_id(case, om.DEFAULTS[kind]),
      "stock",
      _err(res),
      _err(res["f64"]) if "f64" in res else None,
      tol,
    )
  for case in om.DOC_DDIM_CASES:
    ours = om.ddim_ddx(case, key)
    ref, name = (
      (om.ddim_via_dpm1_reference(case), "DPM++ order 1, same grid")
      if case["eta"] == 0
      else (om.ddim_via_ddpm_reference(case, key), "DDPM fixed_small, same grid")
    )
    stock = om.compare(ours, om.ddim_reference(case, key))
    yield (
      "ddim",
      "next listed timestep (linspace / trailing T%S != 0; diffusers#11347)",
      om.case_id(case, om.DDIM_DEFAULTS),
      f"{name} (stock DDIM: {_err(stock):.1e})",
      _err(om.compare(ours, ref)),
      None,
      om.TOL,
    )
  for case in om.DOC_PLMS_CASES:
    ours = om.plms_ddx(case)
    r32 = om.compare(ours, om.plms_converted_reference(case))
    r64 = om.compare(ours, om.plms_converted_reference(case, torch.float64))
    note = ""
    if case["prediction"] == "v":
      note = f" (stock v_prediction: {_err(om.compare(ours, om.plms_reference(case))):.1e})"
    tol = om.TOL
    yield (
      "plms",
      f"{case['prediction']}-prediction converted at the evaluation point",
      om.case_id(case, om.PLMS_DEFAULTS),
      "PNDM eps on converted model" + note,
      _err(r32),
      _err(r64),
      tol,
    )


def _fmt(x):
  return "n/a" if x is None else f"{x:.1e}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--full", action="store_true", help="one row per case instead of per knob group")
  args = ap.parse_args(argv)
  t0 = time.time()
  rows = list(_rows())
  if args.full:
    print("| sampler | knobs (vs defaults) | reference | max rel err (f32 ref) | (f64 ref) | tol | ok |")
    print("|---|---|---|---|---|---|---|")
    for kind, group, cid, ref, e32, e64, tol in rows:
      ok = e32 <= tol and (e64 is None or e64 <= max(tol, om.TOL))
      print(f"| {kind} | {cid} | {ref} | {_fmt(e32)} | {_fmt(e64)} | {tol:g} | {'yes' if ok else '**NO**'} |")
  else:
    groups = collections.OrderedDict()
    for r in rows:
      groups.setdefault((r[0], r[1]), []).append(r)
    print(
      "| sampler | knob group | cases | max rel err vs diffusers (f32) | vs f64-evaluated diffusers "
      "| tol (f32) | all ok |"
    )
    print("|---|---|---|---|---|---|---|")
    for (kind, group), rs in groups.items():
      e32 = max(r[4] for r in rs)
      e64s = [r[5] for r in rs if r[5] is not None]
      ok = all(r[4] <= r[6] and (r[5] is None or r[5] <= max(r[6], om.TOL)) for r in rs)
      tol = max(r[6] for r in rs)
      print(
        f"| {kind} | {group} | {len(rs)} | {_fmt(e32)} | {_fmt(max(e64s) if e64s else None)} | {tol:g} | "
        f"{'yes' if ok else '**NO**'} |"
      )
  print(f"\n{len(rows)} cases, {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
