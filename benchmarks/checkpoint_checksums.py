"""What checkpoint checksums cost on the digits config (configs/digits.py), measured in one run.

    python benchmarks/checkpoint_checksums.py [--repeats=20]

Prints the time to hash every leaf of a training checkpoint (params, EMA, optimizer state,
train record; sha256 of host copies), the blocking part of `Checkpointer.save` that includes
it, one train step, and the resulting share of training time at the config's
checkpoint_every; then the verification share of a restore.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import ddx  # noqa: E402
from ddx import data, parallel  # noqa: E402
from ddx.cli import config as config_lib  # noqa: E402
from ddx.models import UNet  # noqa: E402
from ddx.training import checkpoint
from ddx.training import step as train_lib  # noqa: E402


def median_ms(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  from configs import digits

  cfg = config_lib.validate(digits.get_config())
  m, t = cfg["model"], cfg["train"]
  mesh = parallel.data_mesh(jax.devices()[:1])
  model = UNet(**m, rngs=nnx.Rngs(0))
  optim = config_lib.optimizer_spec(cfg)
  tx = train_lib.make_optimizer(optim)
  graphdef, state = train_lib.init_state(model, tx, jax.random.key(1))
  state = parallel.replicate(state, mesh)
  fn = train_lib.make_train_fn(
    mesh,
    1,
    graphdef=graphdef,
    sched=ddx.schedules.make(**config_lib.schedule_kwargs(cfg["diffusion"])),
    tx=tx,
    lr_fn=train_lib.learning_rate_fn(optim),
    loss=config_lib.loss_spec(cfg),
    ema_decay=t["ema_decay"],
    ema_warmup=t["ema_warmup"],
    num_classes=None,
    label_dropout=0.0,
    use_dropout=False,
  )
  src = data.make_source("digits", image_size=m["image_size"])
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA))
  batch = {
    k: jax.device_put(v[None], sh)
    for k, v in data.get_batch(src, 0, seed=0, global_batch_size=t["global_batch_size"]).items()
    if k in ("image", "label")
  }
  state, _ = fn(state, batch)  # compile
  box = {"state": state}

  def step():
    box["state"], metrics = fn(box["state"], batch)
    jax.block_until_ready(metrics)

  step_ms = median_ms(step, args.repeats)
  items = train_lib.checkpoint_items(box["state"])
  nbytes = sum(
    np.asarray(x).nbytes for x in jax.tree_util.tree_leaves({k: v for k, v in items.items() if k != "train"})
  )
  hash_ms = median_ms(lambda: checkpoint.checksums(items), args.repeats)
  with tempfile.TemporaryDirectory() as wd:
    ck = checkpoint.Checkpointer(wd, max_to_keep=2)
    counter = iter(range(1, 10**6))

    def save():
      ck.save(next(counter), items)
      ck.wait()

    save()  # first save creates directories
    t0 = time.perf_counter()
    ck.save(next(counter), items)
    save_call_ms = 1e3 * (time.perf_counter() - t0)
    ck.wait()
    save_calls = []
    for _ in range(max(3, args.repeats // 4)):
      t0 = time.perf_counter()
      ck.save(next(counter), items)
      save_calls.append(time.perf_counter() - t0)
      ck.wait()
    save_call_ms = 1e3 * float(np.median(save_calls))
    last = ck.latest_step()
    targets = train_lib.checkpoint_targets(box["state"])
    restore_ms = median_ms(lambda: ck.restore(last, targets), max(3, args.repeats // 4))
    ck.close()
  every = t["checkpoint_every"]
  print(
    f"digits config: {nbytes / 2**20:.2f} MiB of arrays per checkpoint "
    f"({len(checkpoint.leaf_paths(items))} leaves incl. the train record)"
  )
  print(f"hash every leaf (sha256):   {hash_ms:8.2f} ms  ({nbytes / 2**20 / (hash_ms / 1e3):.0f} MiB/s)")
  print(f"Checkpointer.save, blocking: {save_call_ms:8.2f} ms  (hashing = {hash_ms / save_call_ms:.0%} of it)")
  print(f"one train step:             {step_ms:8.2f} ms")
  print(
    f"hashing per checkpoint = {hash_ms / step_ms:.3f} train steps; every {every} steps: "
    f"{hash_ms / (every * step_ms):.4%} of training time"
  )
  print(
    f"Checkpointer.restore incl. verification: {restore_ms:.2f} ms (verification ~ one hash pass, "
    f"{hash_ms / restore_ms:.0%})"
  )


if __name__ == "__main__":
  main()
