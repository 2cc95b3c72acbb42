"""ddx vs PyTorch on the CPU: U-Net forward, one Adam training step and a whole DDIM run, float32 and bfloat16.

    python benchmarks/vs_pytorch.py [--quick] [--repeats=1] [--dtypes=float32,bfloat16]
    python benchmarks/vs_pytorch.py --paper      # FLOPs/bytes of a batch-128 step, accelerators on paper

Model: diffusers ``UNet2DModel`` with the google/ddpm-cifar10-32 config (35.7M parameters),
random weights (seed 0) saved as safetensors; ddx loads the same weights with
`ddx.models.from_diffusers`. Batch 16, 32x32x3. Each side runs in its own subprocess, and the
sides alternate (ddx, torch, torch, ddx, ...) ``--repeats`` times; ratios are taken per pair and
the median is printed with the min-max spread (the noise of the machine).

Measured in each worker process (medians after warm-up):

* ``matmul``: a 4096x4096 @ 4096x4096 product in the dtype (XLA: bfloat16 operands with a
  float32 result, the fast path on CPU; torch: bfloat16 tensors) = the ceiling in GFLOP/s.
* ``forward``: the U-Net forward (ddx: jitted; torch: eager, ``inference_mode``, bf16 under
  ``torch.autocast``). Achieved GFLOP/s use XLA's FLOP count of the forward (with XLA's
  convolution ops) for both sides.
* ``train step``: loss (eps-prediction MSE at uniform t) + backward + global-norm clip 1 + Adam
  2e-4 + EMA 0.9999 (ddx: `ddx.training.step.make_train_fn` as ``ddx train`` runs it, including the
  non-finite guard; torch: the same with ``clip_grad_norm_``, ``Adam(foreach)`` and a
  ``_foreach_lerp_`` EMA; bf16 = float32 master weights, bf16 compute / autocast). The first
  call (ddx: trace + XLA compile + run) is reported as "first step"; FLOPs from XLA's cost
  analysis of the compiled step.
* ``DDIM-S``: a whole S-step deterministic DDIM run from x_T (ddx: `ddx.sample` with the DDIM
  sampler, one jitted scan; torch: the usual loop with diffusers' ``DDIMScheduler``). The
  sampler overhead is T(DDIM-S) / (S x T(forward)) in the same process.

The ddx worker calls `ddx.cli.runtime.setup` before JAX starts, as the ``ddx`` command does
(default XLA:CPU flags; the compilation cache is turned off here so compile times are real);
``--no-runtime`` measures the bare library instead. CPU seconds (all threads) are printed
beside wall seconds: on a machine shared with other jobs they are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from _cifar_unet import write_fixture
from _processor import describe as describe_processor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
LR, CLIP, EMA = 2e-4, 1.0, 0.9999

# Peak dense bf16 FLOP/s and HBM bytes/s per chip (vendor data sheets).
ACCELERATORS = {
  "TPU v3 (1 chip = 2 cores)": (123e12, 900e9),
  "TPU v4": (275e12, 1.2e12),
  "TPU v5e": (197e12, 819e9),
  "H100 SXM": (989e12, 3.35e12),
}
PAPER_STEPS_PER_S = 21.0  # DDPM (Ho et al. 2020), CIFAR-10, batch 128, TPU v3-8
PAPER_CHIPS = 4  # a v3-8 slice = 4 chips


class Timer:
  """Wall and process-CPU seconds of a block."""

  def __enter__(self):
    self.c, self.t = time.process_time(), time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.t
    self.cpu = time.process_time() - self.c


def timed(fn, runs: int) -> dict:
  walls, cpus = [], []
  for _ in range(runs):
    with Timer() as tm:
      fn()
    walls.append(tm.wall)
    cpus.append(tm.cpu)
  return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "walls": walls}


# ------------------------------------------------------------------------------------ ddx side


def worker_ddx(args) -> dict:
  if not args.no_runtime:
    os.environ.setdefault("DDX_COMPILATION_CACHE", "off")
    from ddx.cli import runtime

    runtime.setup()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import ddx
  from ddx import parallel
  from ddx.models import from_diffusers
  from ddx.training import step as train

  bf16 = args.dtype == "bfloat16"
  data = np.load(os.path.join(args.dir, "inputs.npz"))
  out: dict = {"side": "ddx", "xla_flags": os.environ.get("XLA_FLAGS", "")}

  a = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
  if bf16:
    a = a.astype(jnp.bfloat16)
  dot = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  dot(a).block_until_ready()
  out["matmul"] = timed(lambda: dot(a).block_until_ready(), args.dot_runs)

  model = from_diffusers(os.path.join(args.dir, "unet"), dtype=args.dtype)
  graphdef, params = nnx.split(model)
  x = jnp.asarray(data["x"].transpose(0, 2, 3, 1))
  t = jnp.asarray(data["t"].astype(np.int32))

  @jax.jit
  def forward(params, x, t):
    return nnx.merge(graphdef, params)(x, t)

  with Timer() as tm:
    compiled = forward.lower(params, x, t).compile()
  out["forward_compile"] = tm.wall
  # FLOPs of the model itself (XLA's convolution ops, as on accelerators): the CPU "dots"
  # path computes a few extra rows, which must not count as useful work.
  lax_model = from_diffusers(os.path.join(args.dir, "unet"), dtype=args.dtype, conv_impl="lax")
  lax_gd, lax_params = nnx.split(lax_model)
  out["forward_flops"] = float(
    jax.jit(lambda p, x, t: nnx.merge(lax_gd, p)(x, t)).lower(lax_params, x, t).cost_analysis().get("flops", 0.0)
  )
  del lax_model, lax_params
  y = compiled(params, x, t).block_until_ready()
  np.save(os.path.join(args.dir, f"fwd_ddx_{args.dtype}.npy"), np.asarray(y).transpose(0, 3, 1, 2))
  out["forward"] = timed(lambda: compiled(params, x, t).block_until_ready(), args.runs)

  # Training step, exactly as `ddx train` builds it (one step per call).
  mesh = parallel.data_mesh()
  sched = ddx.schedules.make("linear", 1000, beta_start=BETAS["beta_start"], beta_end=BETAS["beta_end"])
  spec = train.OptimizerSpec(learning_rate=LR, warmup_steps=0, grad_clip=CLIP)
  tx = train.make_optimizer(spec)
  _, state = train.init_state(model, tx, jax.random.key(1))
  state = parallel.replicate(state, mesh)
  step = train.make_train_fn(
    mesh,
    1,
    graphdef=graphdef,
    sched=sched,
    tx=tx,
    lr_fn=train.learning_rate_fn(spec),
    loss=train.LossSpec(),
    ema_decay=EMA,
    ema_warmup=False,
    num_classes=None,
    label_dropout=0.0,
    use_dropout=False,
  )
  batch = {"image": jnp.asarray(data["x0"].transpose(0, 2, 3, 1))[None], "label": jnp.zeros((1, x.shape[0]), jnp.int32)}
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))
  with Timer() as tm:
    compiled_step = step.lower(state, batch).compile()
  out["step_compile"] = tm.wall
  # the step's FLOPs as run, scaled to the model's own count (see forward_flops)
  out["step_flops"] = float(compiled_step.cost_analysis().get("flops", 0.0)) * (
    out["forward_flops"] / float(compiled.cost_analysis().get("flops", 0.0) or 1.0)
  )
  holder = [state]

  def one_step():
    holder[0], m = compiled_step(holder[0], batch)
    jax.block_until_ready((holder[0], m))
    return m

  with Timer() as tm:
    m = one_step()
  out["step_first"] = out["step_compile"] + tm.wall
  out["step_loss"] = float(m["loss"][0])
  out["step"] = timed(one_step, args.step_runs)

  # A whole DDIM run (deterministic, eta = 0), one jitted scan, with DDIMScheduler's defaults
  # (ddx's own default re-derives eps from the clipped x0, diffusers' does not) so that the
  # two samples can be compared.
  sampler = ddx.samplers.make("ddim", sched, args.steps, eta=0.0, use_clipped_model_output=False)
  x_T = jnp.asarray(data["xT"].transpose(0, 2, 3, 1))
  with Timer() as tm:
    ddx.sample(model, sampler, x_T).block_until_ready()
  out["sample_first"] = tm.wall
  res = {}

  def run():
    res["x"] = ddx.sample(model, sampler, x_T).block_until_ready()

  out["sample"] = timed(run, args.sample_runs)
  np.save(os.path.join(args.dir, f"ddim_ddx_{args.dtype}.npy"), np.asarray(res["x"]).transpose(0, 3, 1, 2))
  return out


# ---------------------------------------------------------------------------------- torch side


def worker_torch(args) -> dict:
  import contextlib

  import torch
  from diffusers import DDIMScheduler, UNet2DModel

  bf16 = args.dtype == "bfloat16"
  tdt = torch.bfloat16 if bf16 else torch.float32
  data = np.load(os.path.join(args.dir, "inputs.npz"))
  out: dict = {"side": "torch", "threads": torch.get_num_threads()}

  autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
  a = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(tdt)
  (a @ a)
  out["matmul"] = timed(lambda: a @ a, args.dot_runs)

  model = UNet2DModel.from_pretrained(os.path.join(args.dir, "unet"), use_safetensors=True)
  x = torch.from_numpy(data["x"])
  t = torch.from_numpy(data["t"])
  model.eval()

  def fwd():
    with torch.inference_mode(), autocast():
      return model(x, t).sample

  with Timer() as tm:
    y = fwd()
  out["forward_compile"] = tm.wall
  np.save(os.path.join(args.dir, f"fwd_torch_{args.dtype}.npy"), y.float().numpy())
  out["forward"] = timed(fwd, args.runs)

  # Training step: same loss, clip, Adam and EMA as ddx.training.step.
  model.train()
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, foreach=True)
  betas = torch.linspace(BETAS["beta_start"], BETAS["beta_end"], 1000, dtype=torch.float64)
  abar = torch.cumprod(1 - betas, 0).float()
  x0 = torch.from_numpy(data["x0"])
  gen = torch.Generator().manual_seed(1)

  def one_step():
    tt = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    ab = abar[tt].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    with autocast():
      pred = model(xt, tt).sample
    loss = torch.mean((pred.float() - eps) ** 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - EMA)
    return float(loss)

  with Timer() as tm:
    out["step_loss"] = one_step()
  out["step_first"] = tm.wall
  out["step"] = timed(one_step, args.step_runs)

  model.load_state_dict(
    {
      k: v
      for k, v in UNet2DModel.from_pretrained(os.path.join(args.dir, "unet"), use_safetensors=True).state_dict().items()
    }
  )
  model.eval()
  sched = DDIMScheduler(**BETAS)
  x_T = torch.from_numpy(data["xT"])
  res = {}

  def run():
    sched.set_timesteps(args.steps)
    xs = x_T
    with torch.inference_mode(), autocast():
      for ts in sched.timesteps:
        eps = model(xs, ts).sample
        xs = sched.step(eps.float(), ts, xs, eta=0.0).prev_sample
    res["x"] = xs

  with Timer() as tm:
    run()
  out["sample_first"] = tm.wall
  out["sample"] = timed(run, args.sample_runs)
  np.save(os.path.join(args.dir, f"ddim_torch_{args.dtype}.npy"), res["x"].float().numpy())
  return out


# ------------------------------------------------------------------------------------- driver


def run_worker(args, side: str, dtype: str) -> dict:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    f"--worker={side}",
    f"--dtype={dtype}",
    f"--dir={args.dir}",
    f"--runs={args.runs}",
    f"--step-runs={args.step_runs}",
    f"--sample-runs={args.sample_runs}",
    f"--dot-runs={args.dot_runs}",
    f"--steps={args.steps}",
  ]
  if args.no_runtime:
    cmd.append("--no-runtime")
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{side} {dtype} worker failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _spread(values) -> str:
  return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(args, dtype: str, pairs: list[tuple[dict, dict]]) -> list[dict]:
  """Print the table for one dtype; return its rows (for --json)."""
  ddx0, torch0 = pairs[0]
  flops_fwd = ddx0["forward_flops"]
  flops_step = ddx0["step_flops"]
  rows = []
  print(
    f"\n== {dtype} (batch {args.batch}; torch {torch0['threads']} threads; "
    f"XLA_FLAGS={ddx0['xla_flags'] or '(none)'}) =="
  )
  print(
    f"{'work':24s} {'torch s':>9s} {'ddx s':>9s} {'torch/ddx wall':>20s} {'torch/ddx cpu':>20s}"
    f" {'torch %ceil':>11s} {'ddx %ceil':>9s}"
  )

  def med(side_rows, key, kind="wall"):
    return statistics.median(r[key][kind] if isinstance(r[key], dict) else r[key] for r in side_rows)

  ddx_rows = [p[0] for p in pairs]
  torch_rows = [p[1] for p in pairs]
  ceil = {
    s: statistics.median(2 * 4096**3 / r["matmul"]["wall"] for r in rs)
    for s, rs in (("ddx", ddx_rows), ("torch", torch_rows))
  }
  for name, key, flops in (
    ("matmul 4096^2", "matmul", 2 * 4096**3),
    ("forward", "forward", flops_fwd),
    ("train step", "step", flops_step),
    (f"DDIM-{args.steps} (whole run)", "sample", args.steps * flops_fwd),
  ):
    wall = [p[1][key]["wall"] / p[0][key]["wall"] for p in pairs]
    cpu = [p[1][key]["cpu"] / p[0][key]["cpu"] for p in pairs]
    tw, dw = med(torch_rows, key), med(ddx_rows, key)
    tc = 100 * flops / tw / ceil["torch"]
    dc = 100 * flops / dw / ceil["ddx"]
    print(f"{name:24s} {tw:9.3f} {dw:9.3f} {_spread(wall):>20s} {_spread(cpu):>20s} {tc:10.0f}% {dc:8.0f}%")
    rows.append(
      dict(
        dtype=dtype,
        work=name,
        torch_s=tw,
        ddx_s=dw,
        ratio_wall=statistics.median(wall),
        ratio_cpu=statistics.median(cpu),
        torch_gflops=flops / tw / 1e9,
        ddx_gflops=flops / dw / 1e9,
      )
    )
  print(
    f"matmul ceiling GFLOP/s: torch {ceil['torch'] / 1e9:.0f}, XLA {ceil['ddx'] / 1e9:.0f};"
    f" forward GFLOP (XLA count) {flops_fwd / 1e9:.1f}, train step {flops_step / 1e9:.1f}"
  )
  for side, rs in (("ddx", ddx_rows), ("torch", torch_rows)):
    over = [r["sample"]["wall"] / (args.steps * r["forward"]["wall"]) for r in rs]
    print(f"sampler overhead {side:5s} T(DDIM-{args.steps}) / ({args.steps} x T(forward)) = {_spread(over)}")
  print(
    f"first training step (ddx: trace + compile + run) {med(ddx_rows, 'step_first'):.1f} s "
    f"(compile {med(ddx_rows, 'step_compile'):.1f} s); "
    f"torch first step {med(torch_rows, 'step_first'):.1f} s; "
    f"ddx forward compile {med(ddx_rows, 'forward_compile'):.1f} s"
  )
  d = args.dir
  fwd = np.load(os.path.join(d, f"fwd_ddx_{dtype}.npy"))
  ref = np.load(os.path.join(d, f"fwd_torch_{dtype}.npy"))
  s_d = np.load(os.path.join(d, f"ddim_ddx_{dtype}.npy"))
  s_t = np.load(os.path.join(d, f"ddim_torch_{dtype}.npy"))
  print(
    f"max|ddx - torch| / max|torch|: forward {np.abs(fwd - ref).max() / np.abs(ref).max():.1e}, "
    f"DDIM-{args.steps} sample {np.abs(s_d - s_t).max() / np.abs(s_t).max():.1e}; "
    f"first-step losses ddx {ddx0['step_loss']:.4f} torch {torch0['step_loss']:.4f} (different draws)"
  )
  # The random-weight U-Net makes the DDIM chain chaotic: torch against itself, with x_T
  # scaled by 1 + 1e-6, differs by 2e-4 at S = 10, 4e-3 at S = 20 and 0.35 at S = 50
  # (measured once, float32). The sample difference therefore grows with S whatever the
  # agreement of one step; the step equations are held to diffusers in tests/.
  print("  (DDIM sample differences grow with S on random weights: the chain amplifies rounding; docs/benchmarks.md)")
  return rows


def paper(args) -> None:
  """FLOPs and bytes of one batch-128 training step from XLA's cost analysis, on paper."""
  os.environ.setdefault("DDX_COMPILATION_CACHE", "off")
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import ddx
  from ddx import parallel
  from ddx.models import UNet
  from ddx.training import step as train

  kwargs = dict(
    image_size=32,
    in_channels=3,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.1,
  )
  batch = args.paper_batch
  mesh = parallel.data_mesh()
  spec = train.OptimizerSpec(learning_rate=LR, grad_clip=CLIP)
  tx = train.make_optimizer(spec)
  # conv_impl="lax": count the convolutions as accelerators run them (XLA's conv op)
  model = nnx.eval_shape(lambda: UNet(**kwargs, dtype=args.paper_dtype, conv_impl="lax", rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  sched = ddx.schedules.make("linear", 1000)
  fn = train.make_train_fn(
    mesh,
    1,
    unroll=True,
    graphdef=graphdef,
    sched=sched,
    tx=tx,
    lr_fn=train.learning_rate_fn(spec),
    loss=train.LossSpec(),
    ema_decay=EMA,
    ema_warmup=False,
    num_classes=None,
    label_dropout=0.0,
    use_dropout=True,
  )
  sds = jax.ShapeDtypeStruct
  state = train.TrainState(
    step=sds((), jnp.int32),
    params=params,
    ema_params=params,
    opt_state=jax.eval_shape(tx.init, params),
    key=sds((2,), jnp.uint32),
    nonfinite=sds((), jnp.int32),
    skipped=sds((), jnp.int32),
  )
  batches = {"image": sds((1, batch, 32, 32, 3), jnp.float32), "label": sds((1, batch), jnp.int32)}
  t0 = time.perf_counter()
  cost = fn.lower(state, batches).compile().cost_analysis()
  flops, nbytes = float(cost["flops"]), float(cost["bytes accessed"])
  print(
    f"DDPM CIFAR-10 U-Net (35.7M params), one training step at batch {batch}, compute dtype "
    f"{args.paper_dtype or 'float32'} (XLA:CPU cost analysis of the compiled step, "
    f"{time.perf_counter() - t0:.0f} s to compile):"
  )
  print(
    f"  {flops / 1e12:.2f} TFLOP, {nbytes / 1e9:.1f} GB accessed (unfused upper bound), "
    f"arithmetic intensity {flops / nbytes:.0f} FLOP/byte"
  )
  eff = args.efficiency
  print(
    f"  implied steps/s at {eff:.0%} of peak bf16 FLOP/s (compute bound) and, beside it, the "
    f"HBM bound at 100% bandwidth:"
  )
  for name, (peak, bw) in ACCELERATORS.items():
    print(f"    {name:28s} {eff * peak / flops:7.1f} steps/s   (HBM bound {bw / nbytes:7.1f})")
  v3 = ACCELERATORS["TPU v3 (1 chip = 2 cores)"][0] * PAPER_CHIPS
  print(
    f"  DDPM paper: TPU v3-8 ({PAPER_CHIPS} chips), {PAPER_STEPS_PER_S:.0f} steps/s at batch 128 = "
    f"{PAPER_STEPS_PER_S * flops * 128 / batch / v3:.0%} of its peak bf16 FLOP/s by this count"
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer runs and DDIM-10, for iteration")
  p.add_argument("--repeats", type=int, default=1, help="ddx/torch worker pairs per dtype")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 10 with --quick)")
  p.add_argument("--runs", type=int, default=None, help="forward runs (default 5; 3 with --quick)")
  p.add_argument("--step-runs", type=int, default=None, help="training steps timed (default 3)")
  p.add_argument("--sample-runs", type=int, default=1)
  p.add_argument("--dot-runs", type=int, default=3)
  p.add_argument(
    "--no-runtime", action="store_true", help="ddx without ddx.cli.runtime.setup (no default XLA:CPU flags)"
  )
  p.add_argument("--json", default=None, help="also write the rows to this file")
  p.add_argument("--paper", action="store_true", help="only the on-paper accelerator estimate")
  p.add_argument("--paper-batch", type=int, default=128)
  p.add_argument("--paper-dtype", default="bfloat16")
  p.add_argument("--efficiency", type=float, default=0.4)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
  args, _ = p.parse_known_args()
  if args.steps is None:
    args.steps = 10 if args.quick else 50
  if args.runs is None:
    args.runs = 3 if args.quick else 5
  if args.step_runs is None:
    args.step_runs = 2 if args.quick else 3

  if args.worker:
    sys.path.insert(0, REPO)
    fn = worker_ddx if args.worker == "ddx" else worker_torch
    print(json.dumps(fn(args)))
    return
  if args.paper:
    sys.path.insert(0, REPO)
    paper(args)
    return

  t_start = time.perf_counter()
  load0 = os.getloadavg()[0]
  all_rows = []
  with tempfile.TemporaryDirectory() as d:
    args.dir = d
    n_params = write_fixture(d, args.batch)
    print(f"processor: {describe_processor()}")
    print(
      f"CIFAR-10 U-Net ({n_params:,} params), batch {args.batch}; {os.cpu_count()} CPUs; "
      f"{args.repeats} ddx/torch pair(s) per dtype, sides alternating; load average {load0:.1f}"
    )
    for dtype in args.dtypes.split(","):
      pairs = []
      for r in range(args.repeats):
        if r % 2 == 0:
          dd = run_worker(args, "ddx", dtype)
          tt = run_worker(args, "torch", dtype)
        else:
          tt = run_worker(args, "torch", dtype)
          dd = run_worker(args, "ddx", dtype)
        pairs.append((dd, tt))
      all_rows += report(args, dtype, pairs)
  print(
    f"\ntorch/ddx > 1: ddx is faster. Spread (min-max) over the {args.repeats} pair(s). "
    f"Total {time.perf_counter() - t_start:.0f} s; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}"
    + (" (machine busy: trust the cpu column more)" if max(load0, os.getloadavg()[0]) > 0.75 * os.cpu_count() else "")
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
  main()
