"""Flag definitions and checks shared by several commands.

"Not given" is always ``None``; a given value is checked for its own range (0 included), and a
bad one is a one-line ``ValueError`` naming the flag.
"""

from __future__ import annotations

import os

from absl import flags


def define_workdir(fv: flags.FlagValues, help_text: str = "Run directory (config.json + checkpoints/).") -> None:
  flags.DEFINE_string("workdir", None, help_text, flag_values=fv)


def define_distributed(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("coordinator", None, "Multi-process coordinator address host:port.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).", flag_values=fv)


def init_distributed(fv: flags.FlagValues) -> None:
  """Start multi-controller JAX when asked to (flags, DDX_* variables, TPU pods, SLURM)."""
  from ddx import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)


def require(fv: flags.FlagValues, *names: str) -> None:
  for n in names:
    if fv[n].value in (None, ""):
      raise ValueError(f"--{n}: required")


def workdir(fv: flags.FlagValues) -> str:
  require(fv, "workdir")
  return os.path.abspath(fv.workdir)


def check_int(fv: flags.FlagValues, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
  """The flag's value if given (``lo <= v <= hi``), else None."""
  v = fv[name].value
  if v is None:
    return None
  if lo is not None and v < lo:
    raise ValueError(f"--{name}: must be >= {lo}, got {v}")
  if hi is not None and v > hi:
    raise ValueError(f"--{name}: must be <= {hi}, got {v}")
  return v


def check_float(fv: flags.FlagValues, name: str, lo: float | None = None, hi: float | None = None) -> float | None:
  """The flag's value if given (finite, ``lo <= v <= hi``), else None."""
  import math  # pylint: disable=import-outside-toplevel
  v = fv[name].value
  if v is None:
    return None
  if not math.isfinite(v):
    raise ValueError(f"--{name}: must be a finite number, got {v}")
  if lo is not None and v < lo:
    raise ValueError(f"--{name}: must be >= {lo}, got {v}")
  if hi is not None and v > hi:
    raise ValueError(f"--{name}: must be <= {hi}, got {v}")
  return v
