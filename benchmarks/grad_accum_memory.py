"""What gradient accumulation saves: XLA's memory analysis of the compiled train step at
train.grad_accum = 1, 2, 4, ... for one config, compiled abstractly (no parameters allocated,
nothing run).

    python benchmarks/grad_accum_memory.py [--config=configs/digits.py] [--accum=1,2,4] [--batch=N]

Prints, per k and for both ways of running the micro-batches (a `lax.scan`, what
accelerators run; unrolled, what the CPU runs by default): the step's temporary buffers
(activations saved for the backward pass and other scratch: what accumulation should divide
by about k) and its arguments (parameters, optimizer state, EMA, the batch: what it cannot
change). One process, one device (the numbers are per device).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ddx import parallel, schedules  # noqa: E402
from ddx.cli import config as config_lib  # noqa: E402
from ddx.models import UNet, abstract  # noqa: E402
from ddx.training import step as train_lib  # noqa: E402


def load_config(path: str):
  import importlib.util  # noqa: PLC0415 -- only to load the config file

  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return config_lib.validate(mod.get_config())


def measure(cfg: dict, batch: int, k: int, unroll: bool | None) -> dict:
  model_cfg = config_lib.model_config(cfg)
  graphdef = nnx.graphdef(abstract(model_cfg))
  spec = train_lib.OptimizerSpec()
  tx = train_lib.make_optimizer(spec)
  state = jax.eval_shape(lambda: train_lib.init_state(UNet(model_cfg, rngs=nnx.Rngs(0)), tx, jax.random.key(0))[1])
  mesh = parallel.data_mesh(jax.devices()[:1])
  fn = train_lib.make_train_fn(
    mesh,
    1,
    graphdef=graphdef,
    sched=schedules.make("linear", cfg["diffusion"]["num_timesteps"]),
    tx=tx,
    lr_fn=train_lib.learning_rate_fn(spec),
    loss=train_lib.LossSpec(),
    ema_decay=0.9999,
    ema_warmup=False,
    num_classes=model_cfg.num_classes,
    label_dropout=0.0,
    use_dropout=model_cfg.dropout > 0,
    grad_accum=k,
    accum_unroll=unroll,
  )
  size, ch = model_cfg.image_size, model_cfg.in_channels
  batches = {
    "image": jax.ShapeDtypeStruct((1, batch, size, size, ch), jnp.float32),
    "label": jax.ShapeDtypeStruct((1, batch), jnp.int32),
  }
  compiled = fn.lower(state, batches).compile()
  mem = compiled.memory_analysis()
  return dict(k=k, temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs", "digits.py"))
  p.add_argument("--accum", default="1,2,4")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
  args = p.parse_args()
  from _processor import describe  # noqa: PLC0415 -- benchmarks/ is the script's directory

  cfg = load_config(args.config)
  batch = args.batch or cfg["train"]["global_batch_size"]
  print(f"processor: {describe()}; backend {jax.default_backend()}")
  print(f"{os.path.relpath(args.config, REPO)}: global batch {batch}, one device")
  head = ("micro-batches", 22), ("grad_accum", 10), ("micro-batch", 11), ("temp MiB", 9), ("vs k=1", 7)
  print(" ".join(f"{name:>{width}s}" for name, width in head) + "  arguments MiB")
  for unroll, how in ((False, "lax.scan (accelerators)"), (True, "unrolled (CPU default)")):
    base = None
    for k in (int(v) for v in args.accum.split(",")):
      if batch % k:
        sys.exit(f"--accum: {k} does not divide the batch {batch}")
      r = measure(cfg, batch, k, unroll)
      base = base or r["temp"]
      print(
        f"{how:>22s} {k:>10d} {batch // k:>11d} {r['temp'] / 2**20:9.1f} {r['temp'] / base:7.2f}"
        f"  {r['args'] / 2**20:.1f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
