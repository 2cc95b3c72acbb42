"""Fixtures of the multi-process tier: the 4-device reference that every 2 x 2 device run
(the local launcher, the simulated SLURM job) is compared with, trained once per run."""

import pytest

from tests._tiny import TRAIN_FLAGS, run_ddx
from tests.conftest import shared_dir

# 4 steps of the tiny run: what the 2-process x 2-device runs train too
MULTIHOST_ARGS = [*TRAIN_FLAGS, "--config.train.total_steps=4"]


@pytest.fixture(scope="session")
def reference_4_devices():
  """A workdir of `MULTIHOST_ARGS` trained by one process driving 4 devices."""
  return shared_dir(
    "reference_4_devices", lambda path: run_ddx(["train", f"--workdir={path}", *MULTIHOST_ARGS], devices=4, timeout=900)
  )
