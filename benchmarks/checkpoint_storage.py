"""A checkpoint of the digits config (configs/digits.py) saved and restored on a local disk
and on a Google Cloud Storage emulator on 127.0.0.1 (tests/_storage.py), in one run.

    python benchmarks/checkpoint_storage.py [--repeats=5]

Each save is `ddx.training.checkpoint.save` of params, EMA, Adam state and the train record
(checksums included), blocking until committed; each restore reads every item and checks
every leaf. Prints the medians and their ratio. The emulator is a single-threaded Python
HTTP server in this process: the ratio bounds the request overhead of the bucket code path
(orbax's commit marker, tensorstore's gcs driver, gcsfs), not the speed of real GCS, whose
latency and bandwidth differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _processor import describe as describe_processor  # noqa: E402
from flax import nnx  # noqa: E402

from ddx.cli import config as config_lib  # noqa: E402
from ddx.models import UNet  # noqa: E402
from ddx.training import checkpoint  # noqa: E402
from ddx.training import step as train_lib  # noqa: E402
from tests._storage import Emulator  # noqa: E402


def _items():
  from configs import digits  # noqa: PLC0415

  cfg = config_lib.validate(digits.get_config())
  model = UNet(**cfg["model"], rngs=nnx.Rngs(0))
  tx = train_lib.make_optimizer(config_lib.optimizer_spec(cfg))
  _, state = train_lib.init_state(model, tx, jax.random.key(1))
  items = train_lib.checkpoint_items(state)
  config = {"model": cfg["model"], "diffusion": cfg["diffusion"]}
  arrays = {k: v for k, v in items.items() if k != "train"}
  nbytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(arrays))
  return items, config, nbytes


def _time(workdir, items, config, repeats):
  saves, restores = [], []
  targets = {name: None for name in items}
  for step in range(repeats):
    t = time.perf_counter()
    checkpoint.save(workdir, step, items, config)
    saves.append(time.perf_counter() - t)
    t = time.perf_counter()
    checkpoint.restore(workdir, step, targets)
    restores.append(time.perf_counter() - t)
  return float(np.median(saves)), float(np.median(restores))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  items, config, nbytes = _items()
  emu = Emulator("gs").start()
  os.environ.update(emu.env)
  try:
    with tempfile.TemporaryDirectory() as tmp:
      local = _time(os.path.join(tmp, "wd"), items, config, args.repeats)
    bucket = _time(emu.root("bench"), items, config, args.repeats)
  finally:
    emu.stop()
  print(f"processor: {describe_processor()}")
  print(f"digits config checkpoint: {nbytes / 2**20:.1f} MiB of arrays (params, EMA, Adam), median of {args.repeats}")
  print("| where | save (s) | restore + verify (s) |")
  print("|---|---|---|")
  print(f"| local disk | {local[0]:.2f} | {local[1]:.2f} |")
  print(f"| GCS emulator, 127.0.0.1 | {bucket[0]:.2f} | {bucket[1]:.2f} |")
  print(f"| ratio bucket / local | {bucket[0] / local[0]:.1f} | {bucket[1] / local[1]:.1f} |")


if __name__ == "__main__":
  main()
