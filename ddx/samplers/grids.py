"""Timestep grids (host-side numpy, validated); docs/samplers.md §4.1.

Every function returns a strictly decreasing int64 array of code indices in [0, T), the
order in which a sampler visits them. Where a reference implementation produces an invalid
grid, ddx raises a ValueError instead of letting JAX clamp an out-of-range index:

* ``leading`` with ``steps_offset`` and S = T reaches index T (diffusers#10003): error.
* ``trailing``: diffusers' float ``arange`` yields S+1 entries ending in -1 for some S
  (T=1000: S = 61, 103, ...). ddx computes the same points exactly and returns S entries,
  i.e. the reference grid without its spurious -1.
* ``compvis_uniform`` (``make_ddim_timesteps``): when T // S does not divide T the reference
  returns ceil(T / (T // S)) steps, more than S; ddx follows it (``len(timesteps)`` is the
  real count) and raises where the reference would index T (S = 3, 9, 27, ... for T = 1000).
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("leading", "trailing", "linspace", "compvis_uniform", "compvis_quad")


def _check_counts(num_train: int, num_steps: int) -> None:
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
    raise ValueError(f"num_steps: must be an integer, got {num_steps!r}")
  if num_steps < 1:
    raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
  if num_steps > num_train:
    raise ValueError(f"num_steps: {num_steps} exceeds the number of training timesteps T={num_train}")


def validate(timesteps: np.ndarray, num_train: int, what: str = "timesteps") -> np.ndarray:
  """Check a grid is 1-D, strictly decreasing and inside [0, T); return it as int64."""
  ts = np.asarray(timesteps)
  if ts.ndim != 1 or ts.shape[0] < 1:
    raise ValueError(f"{what}: expected a non-empty 1-D sequence, got shape {ts.shape}")
  if not np.issubdtype(ts.dtype, np.integer):
    if not np.all(ts == np.round(ts)):
      raise ValueError(f"{what}: timesteps must be integers")
  ts = ts.astype(np.int64)
  if ts.max() >= num_train or ts.min() < 0:
    raise ValueError(f"{what}: entries must lie in [0, {num_train - 1}], got min {ts.min()} max {ts.max()}")
  if np.any(np.diff(ts) >= 0):
    raise ValueError(f"{what}: must be strictly decreasing (no duplicates), got {ts.tolist()[:12]}...")
  return ts


def leading(num_train: int, num_steps: int, steps_offset: int = 0) -> np.ndarray:
  """diffusers ``leading``: ``[(S-1) r, ..., r, 0] + offset`` with ``r = T // S``."""
  _check_counts(num_train, num_steps)
  r = num_train // num_steps
  ts = (np.arange(num_steps, dtype=np.int64) * r)[::-1] + steps_offset
  return validate(ts, num_train, f"timesteps (leading, steps_offset={steps_offset})")


def trailing(num_train: int, num_steps: int) -> np.ndarray:
  """diffusers ``trailing``: ``round(T - k T / S) - 1`` for k = 0..S-1 (starts at T-1)."""
  _check_counts(num_train, num_steps)
  # diffusers' exact float64 values: np.arange fills ``start + k * delta`` with
  # ``delta = (start + step) - start``, which differs from ``step`` in the last bits, so
  # ``T + k * step`` lands on the other side of a .5 for some S (T=1000: S = 48, 96, 112, ...
  # give 937 instead of diffusers' 936). Keep arange, and only its first S entries: for some S
  # its float length overshoots to S+1 with a trailing -1 (the reference's anomaly).
  ts = np.round(np.arange(num_train, 0, -num_train / num_steps))[:num_steps].astype(np.int64) - 1
  return validate(ts, num_train, "timesteps (trailing)")


def linspace(num_train: int, num_steps: int) -> np.ndarray:
  """diffusers DDIM/DDPM ``linspace``: ``round(linspace(0, T-1, S))`` reversed (half-to-even)."""
  _check_counts(num_train, num_steps)
  ts = np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
  return validate(ts, num_train, "timesteps (linspace)")


def compvis_uniform(num_train: int, num_steps: int) -> np.ndarray:
  """CompVis ``make_ddim_timesteps(uniform)``: ``range(0, T, T // S) + 1``, reversed."""
  _check_counts(num_train, num_steps)
  c = num_train // num_steps
  ts = np.arange(0, num_train, c, dtype=np.int64) + 1
  if ts[-1] >= num_train:
    raise ValueError(
      f"num_steps: CompVis uniform spacing with S={num_steps} would index timestep {ts[-1]} = T "
      "(out of range in the reference too); pick another num_steps or spacing='leading'"
    )
  return validate(ts[::-1], num_train, "timesteps (compvis_uniform)")


def compvis_quad(num_train: int, num_steps: int) -> np.ndarray:
  """CompVis ``make_ddim_timesteps(quad)``: ``int(linspace(0, sqrt(0.8 T), S)^2) + 1``, reversed."""
  _check_counts(num_train, num_steps)
  ts = (np.linspace(0, np.sqrt(num_train * 0.8), num_steps) ** 2).astype(np.int64) + 1
  return validate(ts[::-1], num_train, f"timesteps (compvis_quad, S={num_steps} gives duplicates)")


def make(spacing: str, num_train: int, num_steps: int, steps_offset: int = 0) -> np.ndarray:
  """Dispatch on ``spacing`` (one of `SPACINGS`). ``steps_offset`` applies to ``leading`` only,
  as in diffusers' DDIM/DDPM (CompVis grids carry their own +1)."""
  if spacing not in SPACINGS:
    raise ValueError(f"spacing: unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
  if not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
    raise ValueError(f"steps_offset: must be an integer >= 0, got {steps_offset!r}")
  if steps_offset and spacing != "leading":
    raise ValueError(f"steps_offset: only applies to spacing='leading', got spacing={spacing!r}")
  if spacing == "leading":
    return leading(num_train, num_steps, steps_offset)
  return {"trailing": trailing, "linspace": linspace, "compvis_uniform": compvis_uniform, "compvis_quad": compvis_quad}[
    spacing
  ](num_train, num_steps)


def dpm_solver(spacing: str, num_train: int, num_steps: int, steps_offset: int = 0) -> np.ndarray:
  """DPMSolverMultistepScheduler grids: S+1 points with the final one dropped (docs/samplers.md §4.1)."""
  _check_counts(num_train, num_steps)
  if spacing == "linspace":
    if steps_offset:
      raise ValueError("steps_offset: only applies to spacing='leading'")
    ts = np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif spacing == "leading":
    r = num_train // (num_steps + 1)
    ts = (np.arange(0, num_steps + 1) * r).round()[::-1][:-1].astype(np.int64) + steps_offset
  elif spacing == "trailing":
    if steps_offset:
      raise ValueError("steps_offset: only applies to spacing='leading'")
    ts = trailing(num_train, num_steps)
  else:
    raise ValueError(f"spacing: DPM-Solver supports 'linspace', 'leading', 'trailing'; got {spacing!r}")
  return validate(ts, num_train, f"timesteps (dpm_solver, {spacing})")
