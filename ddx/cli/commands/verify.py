"""``python -m ddx verify --workdir=W [--step=N]``: check checkpoints against their checksums.

Reads every item of every committed step (or only ``--step``) and compares each array leaf
with the sha256 recorded when the step was written. Prints one line per step: ``ok``, ``BAD``
with the first bad leaf (or why the step cannot be read), or ``unverified`` for a step written
before ddx recorded checksums (it is still read in full, so it is at least readable). Steps
that ``train`` set aside after a failed verification (``W/checkpoints_corrupt/``) are listed
too. The exit status is 1 if any step in ``W/checkpoints/`` is bad.
"""

from __future__ import annotations

import os

from absl import flags

from ddx import storage
from ddx.cli import limits
from ddx.cli.commands import common
from ddx.training import checkpoint

HELP = "check checkpoints against their checksums: --workdir=W [--step=N]; exit 1 if any is bad"
FLAGS = flags.FlagValues()
common.define_workdir(FLAGS)
flags.DEFINE_integer("step", None, "Check only this checkpoint step (default: all).", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  workdir = common.workdir(FLAGS)
  only = common.check_int(FLAGS, "step", lo=0, hi=limits.MAX_STEP)

  if only is not None:
    steps = [checkpoint.resolve_step(workdir, only)]
  else:
    checkpoint.resolve_step(workdir)  # one clear line for a missing workdir or no checkpoint
    steps = checkpoint.all_steps(workdir)
  counts = {"ok": 0, "bad": 0, "unverified": 0}
  for step in steps:
    status, detail = checkpoint.verify(workdir, step)
    counts[status] += 1
    print(f"step {step}: {status.upper() if status == 'bad' else status}: {detail}", flush=True)
  aside = os.path.join(workdir, checkpoint.CORRUPT_SUBDIR)
  if only is None:
    for name in storage.listdir(aside):
      print(f"{os.path.join(aside, name)}: set aside by train after failing verification (kept; not counted)")
  print(
    f"{len(steps)} checkpoint{'s' if len(steps) != 1 else ''} in {checkpoint.checkpoint_dir(workdir)}: "
    f"{counts['ok']} ok, {counts['bad']} bad, {counts['unverified']} without checksums"
  )
  return 1 if counts["bad"] else 0
