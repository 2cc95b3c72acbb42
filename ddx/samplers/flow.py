"""Samplers for rectified-flow (flow-matching) models: ``flow_euler`` and ``flow_heun``, as
diffusers' FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler; docs/samplers.md
§11.

A flow model is trained on ``x_σ = (1 - σ) x0 + σ eps``, σ in [0, 1], to predict the velocity
``v = eps - x0 = dx/dσ`` (`ddx.losses.flow_loss`), given the timestep ``σ T``. Sampling
integrates that ODE from σ = 1, where x_T is exactly standard normal, to 0. So these are the
Euler and Heun steps of the σ-space samplers (`ddx.samplers.euler`, `ddx.samplers.heun`) with
the velocity as the derivative, the model input x itself, and the grid

    u_k = linspace(1, s(1/T), S),  σ_k = s(u_k),  s(σ) = shift σ / (1 + (shift - 1) σ),

then σ = 0 (SD3's timestep shift; ``shift = 1``: uniform). The last level is s applied twice
to 1/T, as in the reference (which shifts its stored σ_min again).
"""

from __future__ import annotations

import numpy as np

from ddx.samplers import euler, heun
from ddx.samplers import sigmas as sg

PREDICTION = "flow"


def shifted(sigma, shift: float):
  """SD3's timestep shift ``shift σ / (1 + (shift - 1) σ)`` (float64)."""
  sigma = np.asarray(sigma, np.float64)
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def check_shift(shift: float) -> float:
  if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and np.isfinite(shift) and shift > 0):
    raise ValueError(f"shift: must be a finite number > 0, got {shift!r}")
  return float(shift)


def grid(num_steps: int, shift: float = 1.0, num_train: int = 1000) -> sg.Grid:
  """The flow grid: S levels from 1 down (see the module docstring), then 0; timesteps σ T."""
  shift = check_shift(shift)
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps: must be an integer >= 1, got {num_steps!r}")
  if isinstance(num_train, bool) or not isinstance(num_train, (int, np.integer)) or num_train < 2:
    raise ValueError(f"num_train: must be an integer >= 2, got {num_train!r}")
  if num_steps > num_train:
    raise ValueError(f"num_steps: {num_steps} exceeds the number of training timesteps T={num_train}")
  s_min = float(shifted(1.0 / num_train, shift))
  s = shifted(np.linspace(1.0, s_min, num_steps), shift)
  return sg.Grid(sigmas=np.concatenate([s, [0.0]]), timesteps=s * num_train)


def make_euler(sched=None, num_steps: int = 28, *, shift: float = 1.0, num_train: int = 1000) -> euler.Euler:
  """Euler on the flow grid (S model calls). ``sched`` is ignored (flows have no β schedule;
  the argument keeps `ddx.samplers.make`'s signature)."""
  del sched
  g = grid(num_steps, shift, num_train)
  return euler.from_grid(g, PREDICTION, flow=True)


def make_heun(sched=None, num_steps: int = 28, *, shift: float = 1.0, num_train: int = 1000) -> heun.Heun:
  """Heun on the flow grid (2S - 1 model calls, the last step Euler)."""
  del sched
  g = grid(num_steps, shift, num_train)
  return heun.from_grid(g, PREDICTION, flow=True)
