"""Sample quality against the number of sampling steps S for a trained model: the DDIM paper's
Table 1 experiment, run on a ddx workdir.

    python benchmarks/quality_vs_steps.py --workdir=runs/digits_large [--num=1000 --seeds=0]
        [--steps=10,20,50,100,1000] [--samplers=ddpm,ddim0,ddim1,plms,dpm_solver++]
        [--features=digits | --features=inception --inception_weights=PATH] [--out=DIR] [--resume]

Rows: ``ddpm`` = DDPM ancestral sampling with fixed_large variance on the respaced grid (the
DDIM paper's σ̂ row), ``ddim0`` / ``ddim1`` = DDIM η = 0 / 1, ``plms``, ``dpm_solver++`` (2M);
S = 1000 only for ddpm and ddim (as in the paper). These five are the default; the rows
``dpm_solver++_karras``, ``dpm_solver++_3m``, ``unipc``, ``unipc_karras``, ``euler_karras``,
``heun_karras`` (2S - 1 model calls) and ``lms_karras`` add the samplers of docs/samplers.md
§6-§10 for a quality-per-model-call study. Every sampler uses what ``ddx sample`` /
``ddx eval`` use for this workdir: the EMA weights, the config's per-step x0 handling
(``sample.clip_sample``; DDIM then re-derives eps from the clipped x0) and the default
(leading) grid. For each seed, every (sampler, S) starts from the same x_T
(`ddx.eval.quality.measure` with ``key(seed)``); N samples are measured against the training
data's cached reference statistics (digits features by default). With several seeds the
table gives the mean (± std over seeds).

Writes ``quality_vs_steps.md`` (FD and KID tables, and the DDIM paper's CIFAR-10 FIDs for
comparison), ``quality_vs_steps.json`` and ``quality_vs_steps.png`` (FD vs S, log x) into
``--out`` (default: the workdir). With digits features the plot and table also give the FD
floor of real data: FD(held-out digits, training digits) on the digits feature network's own
split (360 vs 1437 images).

The JSON is rewritten after every measured cell. With ``--resume`` the cells already in
``<out>/quality_vs_steps.json`` are kept and not measured again, if that file was written for
the same checkpoint step, feature network and N: an interrupted study continues where it
stopped, and a column (say S = 1000) can be added to a finished one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# label, sampler name, eta, diffusion overrides
# row -> (label, sampler, eta, diffusion-section overrides, noise-level grid or None)
ROWS = {
  "ddpm": ("ddpm σ̂ (fixed_large)", "ddpm", 0.0, {"variance": "fixed_large"}, None),
  "ddim0": ("ddim η=0", "ddim", 0.0, {}, None),
  "ddim1": ("ddim η=1", "ddim", 1.0, {}, None),
  "plms": ("plms", "plms", 0.0, {}, None),
  "dpm_solver++": ("dpm_solver++ (2M)", "dpm_solver++", 0.0, {}, None),
  # the samplers of docs/samplers.md §6-§10, for the quality-per-model-call study (Heun makes
  # 2S - 1 model calls, the others S)
  "dpm_solver++_karras": ("dpm_solver++ 2M, Karras", "dpm_solver++", 0.0, {}, "karras"),
  "dpm_solver++_3m": ("dpm_solver++ 3M", "dpm_solver++_3m", 0.0, {}, None),
  "unipc": ("unipc 2 (bh2)", "unipc", 0.0, {}, None),
  "unipc_karras": ("unipc 2, Karras", "unipc", 0.0, {}, "karras"),
  "euler_karras": ("euler, Karras", "euler", 0.0, {}, "karras"),
  "heun_karras": ("heun, Karras (2S - 1 calls)", "heun", 0.0, {}, "karras"),
  "lms_karras": ("lms, Karras", "lms", 0.0, {}, "karras"),
}
DEFAULT_ROWS = ("ddpm", "ddim0", "ddim1", "plms", "dpm_solver++")
FULL_CHAIN_ONLY = ("ddpm", "ddim0", "ddim1")  # the rows that also run S = T
STEPS = (10, 20, 50, 100, 1000)
# DDIM paper (Song et al. 2021), Table 1, CIFAR-10 FID, S = 10, 20, 50, 100, 1000
PAPER = {
  "ddim0": (13.36, 6.84, 4.67, 4.16, 4.04),
  "ddim1": (41.07, 18.36, 8.01, 5.78, 4.73),
  "ddpm": (367.43, 133.37, 32.72, 9.99, 3.17),
}


def plan(rows, steps, num_timesteps: int):
  """[(row, S)] to run: every row at every S, except S = T for the rows that are not DDPM/DDIM."""
  return [(r, s) for r in rows for s in steps if s < num_timesteps or r in FULL_CHAIN_ONLY]


def _ints(text: str, name: str) -> list[int]:
  try:
    vals = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise SystemExit(f"--{name}: expected comma-separated integers, got {text!r}") from None
  if not vals:
    raise SystemExit(f"--{name}: empty")
  return vals


def _fmt(vals, digits=4):
  if not vals:
    return "–"
  import numpy as np

  m = float(np.mean(vals))
  return f"{m:.{digits}g}" + (f" ± {float(np.std(vals)):.2g}" if len(vals) > 1 else "")


def tables(results, rows, steps, *, fd_name: str, floor: float | None, num: int, seeds, kid_scale: float = 1.0) -> str:
  """Markdown tables. KID is multiplied by ``kid_scale`` (1e3 for Inception features, the
  published convention; the digits features' KID is on its own larger scale, shown as is)."""
  head = "| sampler | " + " | ".join(f"S={s}" for s in steps) + " |"
  sep = "|" + "---|" * (len(steps) + 1)
  out = [f"{fd_name} (N = {num} samples, seeds {', '.join(map(str, seeds))}):", "", head, sep]
  for r in rows:
    out.append(
      f"| {ROWS[r][0]} | " + " | ".join(_fmt([x["fd"] for x in results.get((r, s), [])]) for s in steps) + " |"
    )
  if floor is not None:
    out += ["", f"Floor (real data): FD(held-out digits, training digits) = {floor:.4g} (360 vs 1437 images)."]
  out += ["", "KID (×10³):" if kid_scale == 1e3 else "KID:", "", head, sep]
  for r in rows:
    out.append(
      f"| {ROWS[r][0]} | "
      + " | ".join(_fmt([kid_scale * x["kid_mean"] for x in results.get((r, s), [])], 3) for s in steps)
      + " |"
    )
  out += [
    "",
    "DDIM paper, Table 1 (CIFAR-10 FID, 50k samples), for the shape:",
    "",
    "| sampler | " + " | ".join(f"S={s}" for s in STEPS) + " |",
    "|" + "---|" * (len(STEPS) + 1),
  ]
  for r, vals in PAPER.items():
    out.append(f"| {ROWS[r][0]} | " + " | ".join(f"{v:g}" for v in vals) + " |")
  return "\n".join(out)


def plot(results, rows, steps, path: str, *, fd_name: str, floor: float | None, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
  for r in rows:
    pts = [(s, np.mean([x["fd"] for x in results[(r, s)]])) for s in steps if (r, s) in results]
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=ROWS[r][0])
  if floor is not None:
    ax.axhline(floor, color="grey", ls="--", lw=1, label="real data (held-out vs training)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("sampling steps S")
  ax.set_ylabel(fd_name)
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def digits_floor(net) -> float:
  from ddx.eval import digits_net, features, frechet

  (xtr, _), (xte, _) = digits_net.split_data()
  return frechet.frechet_distance(features.compute_features(net, xtr, 250), features.compute_features(net, xte, 250))


def previous_results(path: str, *, step: int, features: str, num: int) -> dict:
  """{(row, S): [cell, ...]} of an earlier run's JSON at ``path`` if it measured the same
  checkpoint ``step`` with the same ``features`` and ``num``; {} if there is no such file.
  A file from other settings is an error rather than something to mix in or overwrite."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  theirs = (old.get("step"), old.get("features"), old.get("num"))
  if theirs != (step, features, num):
    raise SystemExit(
      f"--resume: {path} holds step {theirs[0]}, features {theirs[1]}, N={theirs[2]}; "
      f"this run is step {step}, features {features}, N={num} (use another --out)"
    )
  results: dict = {}
  for x in old.get("results", []):
    x = dict(x)
    results.setdefault((x.pop("sampler"), x.pop("steps")), []).append(x)
  return results


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num", type=int, default=1000, help="samples per (sampler, S, seed)")
  ap.add_argument("--seeds", default="0", help="comma-separated seeds")
  ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated S")
  ap.add_argument("--samplers", default=",".join(DEFAULT_ROWS), help=f"comma-separated rows of {tuple(ROWS)}")
  ap.add_argument("--features", default="digits", help="digits | inception")
  ap.add_argument("--inception_weights", default=None)
  ap.add_argument("--batch", type=int, default=250)
  ap.add_argument("--cache_dir", default=None, help="reference statistics (default <workdir>/eval_cache)")
  ap.add_argument("--out", default=None, help="output directory (default: the workdir)")
  ap.add_argument(
    "--resume",
    action="store_true",
    help="keep the cells of <out>/quality_vs_steps.json measured with the same step, features and N",
  )
  args = ap.parse_args(argv)

  from ddx.eval import quality
  from ddx.training import checkpoint

  workdir = os.path.abspath(args.workdir)
  cfg = checkpoint.read_config(workdir)
  checkpoint.resolve_step(workdir, None)  # a clear error without a checkpoint
  T = cfg["diffusion"].get("num_timesteps", 1000)
  steps = _ints(args.steps, "steps")
  seeds = _ints(args.seeds, "seeds")
  if any(s < 1 or s > T for s in steps):
    raise SystemExit(f"--steps: every S must be in [1, {T}], got {args.steps!r}")
  rows = [r.strip() for r in args.samplers.split(",") if r.strip()]
  bad = [r for r in rows if r not in ROWS]
  if bad or not rows:
    raise SystemExit(f"--samplers: must be among {tuple(ROWS)}, got {args.samplers!r}")
  if args.num < 2 or args.batch < 1:
    raise SystemExit(f"--num: must be >= 2 (got {args.num}); --batch >= 1 (got {args.batch})")
  size, ch = cfg["model"]["image_size"], cfg["model"]["in_channels"]
  try:
    quality.check_features(args.features, (size, size, ch), name="--features")
    net = quality.feature_net(args.features, args.inception_weights)
  except ValueError as e:
    raise SystemExit(str(e) if str(e).startswith("--") else f"--{e}") from None

  import jax
  from flax import nnx

  import ddx
  from ddx import parallel
  from ddx.cli import config as config_lib
  from ddx.cli import restore

  data = cfg.get("data", {})
  source = ddx.data.make_source(
    data.get("name", "digits"),
    split=data.get("split", "train"),
    data_dir=data.get("data_dir"),
    image_size=data.get("image_size") or None,
    center_crop=data.get("center_crop"),
  )
  cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else os.path.join(workdir, "eval_cache")
  ref = quality.reference_for_source(
    net,
    source,
    cache_dir=cache_dir,
    dataset=data.get("name", "digits"),
    split=data.get("split", "train"),
    batch=args.batch,
  )
  model, _, step = restore.load_model(workdir, which="ema_params")
  graphdef, params = nnx.split(model, nnx.Param)
  mesh = parallel.data_mesh()
  params = parallel.replicate(params, mesh)
  num_classes = cfg["model"].get("num_classes")
  sched = ddx.schedules.make(**config_lib.schedule_kwargs(cfg["diffusion"]))
  clip = cfg.get("sample", {}).get("clip_sample", True)
  floor = digits_floor(net) if args.features == "digits" and data.get("name", "digits") == "digits" else None
  fd_name = "FID" if args.features == "inception" else "digits FD"
  if floor is not None:
    print(f"floor: FD(held-out digits, training digits) = {floor:.4g}", flush=True)

  out = os.path.abspath(args.out) if args.out else workdir
  os.makedirs(out, exist_ok=True)
  json_path = os.path.join(out, "quality_vs_steps.json")
  results: dict = {}
  if args.resume:
    for cell, xs in previous_results(json_path, step=step, features=net.name, num=args.num).items():
      mine = [x for x in xs if x["seed"] in seeds]  # other seeds are not part of this study
      if mine:
        results[cell] = mine
  kept = [(r, s, x["seed"]) for (r, s), xs in results.items() for x in xs]
  if args.resume:
    print(f"--resume: {len(kept)} measured cell(s) kept from {json_path}", flush=True)

  def save():
    with open(json_path, "w") as f:
      json.dump(
        {
          "workdir": workdir,
          "step": step,
          "features": net.name,
          "num": args.num,
          "seeds": seeds,
          "floor": floor,
          "results": [{"sampler": r, "steps": s, **x} for (r, s), xs in results.items() for x in xs],
        },
        f,
        indent=1,
      )

  todo = plan(rows, steps, T)
  t0 = time.time()
  for i, (r, S) in enumerate(todo):
    _, name, eta, overrides, grid = ROWS[r]
    kw = config_lib.sampler_kwargs(
      {**cfg["diffusion"], **overrides}, sampler=name, eta=eta, clip_sample=clip, sigmas=grid
    )
    fn = ddx.sampling.make_sample_fn(graphdef, ddx.samplers.make(name, sched, S, **kw), num_classes, mesh)
    for seed in seeds:
      if (r, S, seed) in kept:
        continue
      m = quality.measure(
        fn,
        params,
        image_shape=(size, size, ch),
        num=args.num,
        batch=args.batch,
        key=jax.random.key(seed),
        net=net,
        reference=ref,
        num_classes=num_classes,
      )
      results.setdefault((r, S), []).append({"seed": seed, **m})
      save()
      el = time.time() - t0
      done = i + (seeds.index(seed) + 1) / len(seeds)
      print(
        f"[{i + 1}/{len(todo)}] {ROWS[r][0]:20s} S={S:<5d} seed {seed}: {fd_name} {m['fd']:.4g}  "
        f"KID {m['kid_mean']:.3g}   {el:.0f} s elapsed, ~{el / done * (len(todo) - done):.0f} s to go",
        flush=True,
      )

  title = (
    f"{os.path.basename(workdir)} (step {step}, EMA): {fd_name} vs S, N={args.num}, seeds {','.join(map(str, seeds))}"
  )
  table = tables(
    results,
    rows,
    steps,
    fd_name=fd_name,
    floor=floor,
    num=args.num,
    seeds=seeds,
    kid_scale=1e3 if args.features == "inception" else 1.0,
  )
  print("\n" + table)
  save()
  with open(os.path.join(out, "quality_vs_steps.md"), "w") as f:
    f.write(f"{title}\n\n{table}\n")
  png = os.path.join(out, "quality_vs_steps.png")
  plot(results, rows, steps, png, fd_name=fd_name, floor=floor, title=title)
  print(f"wrote {png}, quality_vs_steps.md and quality_vs_steps.json in {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
