"""A training process killed with SIGKILL: the rerun resumes bitwise. The process boundary is
the subject, so this runs ``python -m ddx train`` as a child process. (SIGTERM: every task of
a simulated SLURM job checkpoints and exits cleanly, tests/multiprocess/test_launch.py.)"""

import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ddx import storage
from ddx.training import checkpoint
from tests._tiny import ROOT, TRAIN_FLAGS, assert_bitwise_equal, run_ddx, saved, subprocess_env

# the run's shared tiny workdir was trained in-process on the 8 test devices: the same program
DEVICES = 8


def _start_training(workdir, *flags):
  return subprocess.Popen(
    [sys.executable, "-m", "ddx", "train", f"--workdir={workdir}", *TRAIN_FLAGS, *flags],
    cwd=ROOT,
    env=subprocess_env(DEVICES),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait_for(predicate, proc, seconds=300):
  deadline = time.time() + seconds
  while time.time() < deadline and proc.poll() is None and not predicate():
    time.sleep(0.1)
  assert proc.poll() is None, proc.communicate()[0][-3000:]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_kill9_then_rerun_resumes_bitwise(_trained_run, tmp_path, ddx_cli, request, where):
  """Killed at a random point after its first checkpoint, the rerun ends with the params,
  EMA, optimizer state and train record of the uninterrupted run (on a local disk), bit for
  bit; in a local workdir and in one on a bucket (the GCS emulator: there orbax commits a
  step with a marker object, and the killed run's workdir lease is taken over at once)."""
  b = str(tmp_path / "b") if where == "local" else request.getfixturevalue("gcs").root(f"kill9-{tmp_path.name}")
  proc = _start_training(b, "--config.train.total_steps=12")
  try:
    _wait_for(lambda: checkpoint.all_steps(b), proc)
    time.sleep(random.uniform(0.0, 0.5))
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_at = checkpoint.latest_step(b)
  assert killed_at is not None and killed_at < 12, killed_at
  out = run_ddx(["train", f"--workdir={b}", *TRAIN_FLAGS, "--config.train.total_steps=12"], devices=DEVICES)
  assert "resumed from" in out.stdout
  sa, ia = saved(_trained_run)
  sb, ib = saved(b)
  assert sa == sb == 12
  for k in ("params", "ema_params", "opt_state", "train"):
    assert_bitwise_equal(ia[k], ib[k])
  # metrics.jsonl has no duplicated steps after the resume
  steps = [json.loads(line)["step"] for line in storage.read_text(os.path.join(b, "metrics.jsonl")).splitlines()]
  assert steps == sorted(set(steps))
  # and the resumed run samples (PNG grid + npz)
  code, out, err = ddx_cli("sample", f"--workdir={b}", "--steps=3", "--num=8")
  assert code == 0 and "wrote" in out, err[-2000:]
  (name,) = [n for n in storage.listdir(os.path.join(b, "samples")) if n.endswith("_ddim3.npz")]
  npz = np.load(io.BytesIO(storage.read_bytes(os.path.join(b, "samples", name))))
  assert npz["samples"].shape == (8, 8, 8, 1) and np.all(np.isfinite(npz["samples"]))
