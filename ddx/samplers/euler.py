"""Euler and Euler ancestral in σ space (Karras et al. 2022; k-diffusion's ``sample_euler`` and
``sample_euler_ancestral``, diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler``); docs/samplers.md §9.

One model call per step ``σ_k -> σ_{k+1}``, with ``d = (x̂ - x0) / σ̂`` the ODE derivative:

    euler:            x̂ = x + s_noise sqrt(σ̂² - σ_k²) z      (churn, σ̂ = σ_k (1 + γ_k); else x̂ = x)
                      x' = x̂ + d (σ_{k+1} - σ̂)
    euler_ancestral:  σ_up = min(σ_{k+1}, eta sqrt(σ_{k+1}² (σ_k² - σ_{k+1}²) / σ_k²)),
                      σ_down = sqrt(σ_{k+1}² - σ_up²)
                      x' = x + d (σ_down - σ_k) + s_noise σ_up z

Both are one class: ``pre`` is the churn noise coefficient before the call, ``post`` the
ancestral one after it (never both non-zero, so one draw per call serves either).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct

from ddx.samplers import base
from ddx.samplers import sigmas as sg  # the module; `sigmas` is also a keyword argument
from ddx.schedules import Schedule


@struct.dataclass
class Euler(sg.SigmaCommon):
  init_sigma: jax.Array  # float32 []: sqrt(σ_0² + 1), the scale of x_T
  timesteps: jax.Array  # float32 [S] model timestep (at σ̂)
  c_in: jax.Array  # 1 / sqrt(σ̂² + 1)
  sigma_hat: jax.Array  # the level the model is evaluated at
  pre: jax.Array  # churn: noise added before the call
  dt: jax.Array  # σ_{k+1} - σ̂ (euler) or σ_down - σ_k (ancestral)
  post: jax.Array  # ancestral: noise added after the step
  prediction: str = struct.field(pytree_node=False, default="eps")
  stochastic: bool = struct.field(pytree_node=False, default=False)

  def model_input(self, state, i, noise):
    x = state.x if noise is None else state.x + self.pre[i] * noise
    return x * self.c_in[i], self.timesteps[i]

  def step(self, state: base.State, model_output: jax.Array, i, noise=None) -> base.State:
    out, _ = base.split_output(model_output, state.x)
    x = state.x if noise is None else state.x + self.pre[i] * noise
    x0 = sg.to_x0(out, x, self.sigma_hat[i], self.prediction)
    x_next = x + sg.derivative(out, x, x0, self.sigma_hat[i], self.prediction) * self.dt[i]
    if noise is not None:
      x_next = x_next + self.post[i] * noise
    return base.State(x=x_next, x0=x0)


def from_grid(
  grid: sg.Grid, prediction: str, *, s_hat=None, t_hat=None, pre=None, flow: bool = False, scale_input: bool = True
) -> Euler:
  """Euler on a σ grid (``s_hat``, ``t_hat``, ``pre``: the churn of `sigmas.churn`, none by
  default). ``flow``: a rectified-flow grid (`ddx.samplers.flow`): the model sees x itself,
  from x_T unscaled; ``scale_input=False``: the model sees x itself (EDM's preconditioned
  denoiser scales its own input)."""
  s_hat = grid.sigmas[:-1] if s_hat is None else s_hat
  pre = np.zeros(grid.num_steps) if pre is None else pre
  return Euler(
    init_sigma=base.f32(1.0 if flow else sg.init_sigma(grid)),
    timesteps=base.f32(grid.timesteps if t_hat is None else t_hat),
    c_in=base.f32(sg.c_in(s_hat) if scale_input and not flow else np.ones_like(s_hat)),
    sigma_hat=base.f32(s_hat),
    pre=base.f32(pre),
    dt=base.f32(grid.sigmas[1:] - s_hat),
    post=base.f32(np.zeros(grid.num_steps)),
    prediction=prediction,
    stochastic=bool(np.any(pre > 0)),
  )


def make(
  sched: Schedule,
  num_steps: int,
  *,
  spacing: str = "linspace",
  steps_offset: int = 0,
  sigmas: str | None = None,
  rho: float = 7.0,
  final_sigma: str = "zero",
  prediction: str = "eps",
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = float("inf"),
  s_noise: float = 1.0,
) -> Euler:
  """Euler (deterministic unless ``s_churn > 0``) with S model calls; defaults as diffusers'
  EulerDiscreteScheduler (linspace spacing, final σ 0)."""
  grid = sg.make(
    sched,
    num_steps,
    spacing=spacing,
    steps_offset=steps_offset,
    sigmas=sigmas,
    rho=rho,
    final_sigma=final_sigma,
    prediction=prediction,
  )
  s_hat, t_hat, pre = sg.churn(grid, sched, s_churn, s_tmin, s_tmax, s_noise)
  return from_grid(grid, prediction, s_hat=s_hat, t_hat=t_hat, pre=pre)


def make_ancestral(
  sched: Schedule,
  num_steps: int,
  *,
  eta: float = 1.0,
  spacing: str = "linspace",
  steps_offset: int = 0,
  sigmas: str | None = None,
  rho: float = 7.0,
  final_sigma: str = "zero",
  prediction: str = "eps",
  s_noise: float = 1.0,
) -> Euler:
  """Euler ancestral with S model calls; ``eta = 1`` (the default) is diffusers'
  EulerAncestralDiscreteScheduler, ``eta = 0`` plain Euler."""
  if not (np.isfinite(eta) and eta >= 0):
    raise ValueError(f"eta: must be a finite number >= 0, got {eta!r}")
  if not (np.isfinite(s_noise) and s_noise > 0):
    raise ValueError(f"s_noise: must be a finite number > 0, got {s_noise!r}")
  grid = sg.make(
    sched,
    num_steps,
    spacing=spacing,
    steps_offset=steps_offset,
    sigmas=sigmas,
    rho=rho,
    final_sigma=final_sigma,
    prediction=prediction,
  )
  s, s_next = grid.sigmas[:-1], grid.sigmas[1:]
  up = np.minimum(s_next, eta * np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
  down = np.sqrt(np.maximum(s_next**2 - up**2, 0.0))
  zeros = np.zeros(grid.num_steps)
  return Euler(
    timesteps=base.f32(grid.timesteps),
    c_in=base.f32(sg.c_in(s)),
    sigma_hat=base.f32(s),
    pre=base.f32(zeros),
    dt=base.f32(down - s),
    post=base.f32(s_noise * up),
    init_sigma=base.f32(sg.init_sigma(grid)),
    prediction=prediction,
    stochastic=bool(np.any(up > 0)),
  )
