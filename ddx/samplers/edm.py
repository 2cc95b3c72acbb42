"""Samplers for EDM-preconditioned models (`ddx.edm`): ``edm_euler`` and ``edm_heun``, as
diffusers' EDMEulerScheduler (Euler) and Karras et al.'s Algorithm 2 (Heun); docs/samplers.md
§11.

The model function is the denoiser ``D(x, σ)`` of `ddx.edm.precondition` (an x0 prediction),
called on the variance-exploding sample ``x = x0 + σ n`` itself with the timestep σ. The grid
is EDM's: S levels ``(σ_max^(1/ρ) + r (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ`` (Karras, ρ = 7) or
log-uniform (``schedule="exponential"``) from σ_max = 80 to σ_min = 0.002, then 0 (or σ_min
again with ``final_sigma="sigma_min"``); x_T is scaled by ``sqrt(σ_max² + 1)``, as the reference.
The Euler and Heun steps are those of `ddx.samplers.euler` and `ddx.samplers.heun`, churn
included.
"""

from __future__ import annotations

import numpy as np

from ddx.samplers import euler, heun
from ddx.samplers import sigmas as sg

SCHEDULES = ("karras", "exponential")
PREDICTION = "x0"


def grid(
  num_steps: int,
  *,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  schedule: str = "karras",
  final_sigma: str = "zero",
) -> sg.Grid:
  """EDM's σ grid (see the module docstring); the timesteps are the σ themselves."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps: must be an integer >= 1, got {num_steps!r}")
  if not (np.isfinite(sigma_min) and sigma_min > 0):
    raise ValueError(f"sigma_min: must be a finite number > 0, got {sigma_min!r}")
  if not (np.isfinite(sigma_max) and sigma_max > sigma_min):
    raise ValueError(f"sigma_max: must be a finite number > sigma_min ({sigma_min}), got {sigma_max!r}")
  if not (isinstance(rho, (int, float)) and np.isfinite(rho) and rho > 0):
    raise ValueError(f"rho: must be a finite number > 0, got {rho!r}")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule: unknown {schedule!r}; expected one of {SCHEDULES}")
  if final_sigma not in sg.FINAL_SIGMAS:
    raise ValueError(f"final_sigma: unknown {final_sigma!r}; expected one of {sg.FINAL_SIGMAS}")
  if schedule == "karras":
    s = sg.karras(sigma_min, sigma_max, num_steps, rho)
  else:
    s = sg.exponential(sigma_min, sigma_max, num_steps)
  last = s[-1] if final_sigma == "sigma_min" else 0.0
  return sg.Grid(sigmas=np.concatenate([s, [last]]), timesteps=s)


def make_euler(
  sched=None,
  num_steps: int = 50,
  *,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  schedule: str = "karras",
  final_sigma: str = "zero",
) -> euler.Euler:
  """Euler on EDM's grid (S model calls; the keywords as `grid`). ``sched`` is ignored."""
  del sched
  g = grid(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, schedule=schedule, final_sigma=final_sigma)
  return euler.from_grid(g, PREDICTION, scale_input=False)


def make_heun(
  sched=None,
  num_steps: int = 18,
  *,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  rho: float = 7.0,
  schedule: str = "karras",
  final_sigma: str = "zero",
) -> heun.Heun:
  """Heun on EDM's grid (2S - 1 model calls; EDM's own default S = 18)."""
  del sched
  g = grid(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, schedule=schedule, final_sigma=final_sigma)
  return heun.from_grid(g, PREDICTION, scale_input=False, t_of_sigma=lambda s: s)
