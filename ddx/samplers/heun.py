"""Heun's second-order method in σ space (Karras et al. 2022, Algorithm 2; k-diffusion's
``sample_heun``, diffusers' ``HeunDiscreteScheduler``); docs/samplers.md §9.

Step ``σ_k -> σ_{k+1}`` takes two model calls (one on the last step when σ_{k+1} = 0):

    call A at σ̂ = σ_k (1 + γ_k):  x̂ = x + s_noise sqrt(σ̂² - σ_k²) z   (churn; else x̂ = x)
                                   d = (x̂ - x0(x̂, σ̂)) / σ̂,   x_e = x̂ + d (σ_{k+1} - σ̂)
    call B at σ_{k+1} on x_e:      d' = (x_e - x0(x_e, σ_{k+1})) / σ_{k+1}
                                   x' = x̂ + (d + d') / 2 (σ_{k+1} - σ̂)

The final step to σ = 0 is the Euler step x_e. So S steps make 2S - 1 model calls (2S with
``final_sigma="sigma_min"``). The call tables alternate A and B; the state carries x̂ and d
from A to B.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddx.samplers import base
from ddx.samplers import sigmas as sg  # the module; `sigmas` is also a keyword argument
from ddx.schedules import Schedule


class HeunState(NamedTuple):
  x: jax.Array  # the sample the model is evaluated on next
  x0: jax.Array  # latest x0 prediction
  saved: jax.Array  # x̂ of the current step (call A)
  d: jax.Array  # its derivative


@struct.dataclass
class Heun(sg.SigmaCommon):
  init_sigma: jax.Array  # float32 []: sqrt(σ_0² + 1), the scale of x_T
  timesteps: jax.Array  # float32 [N]
  c_in: jax.Array  # 1 / sqrt(σ_eval² + 1)
  sigma_eval: jax.Array  # σ̂ (call A) or σ_{k+1} (call B)
  second: jax.Array  # bool [N]: call B
  pre: jax.Array  # churn noise coefficient (call A)
  dt: jax.Array  # σ_{k+1} - σ̂ of the call's step
  prediction: str = struct.field(pytree_node=False, default="eps")
  stochastic: bool = struct.field(pytree_node=False, default=False)

  def init(self, x_T: jax.Array) -> HeunState:
    s = super().init(x_T)
    return HeunState(x=s.x, x0=s.x0, saved=s.x, d=jnp.zeros_like(s.x))

  def model_input(self, state, i, noise):
    x = state.x if noise is None else state.x + self.pre[i] * noise
    return x * self.c_in[i], self.timesteps[i]

  def step(self, state: HeunState, model_output: jax.Array, i, noise=None) -> HeunState:
    out, _ = base.split_output(model_output, state.x)
    x = state.x if noise is None else state.x + self.pre[i] * noise  # pre = 0 on call B
    x0 = sg.to_x0(out, x, self.sigma_eval[i], self.prediction)
    d = sg.derivative(out, x, x0, self.sigma_eval[i], self.prediction)
    second = self.second[i]
    start = jnp.where(second, state.saved, x)
    slope = jnp.where(second, 0.5 * (state.d + d), d)
    return HeunState(x=start + slope * self.dt[i], x0=x0, saved=x, d=d)


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
) -> Heun:
  """Heun with S steps (2S - 1 model calls); defaults as diffusers' HeunDiscreteScheduler."""
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
  log_table = np.log(sg.schedule_sigmas(sched))
  return from_grid(
    grid, prediction, s_hat=s_hat, t_hat=t_hat, pre=pre, t_of_sigma=lambda s: sg.sigma_to_t(s, log_table)
  )


def from_grid(
  grid: sg.Grid, prediction: str, *, s_hat=None, t_hat=None, pre=None, t_of_sigma=None, flow=False, scale_input=True
) -> Heun:
  """The Heun tables of a σ grid (``s_hat``, ``t_hat``, ``pre``: the churn of `sigmas.churn`, none
  by default; ``t_of_sigma``: the model timestep of the final level if it is not 0). ``flow``:
  a rectified-flow grid (`ddx.samplers.flow`): the model sees x itself, from x_T unscaled;
  ``scale_input=False``: the model sees x itself (EDM's preconditioned denoiser)."""
  n = grid.num_steps
  s_hat = grid.sigmas[:-1] if s_hat is None else s_hat
  t_hat = grid.timesteps if t_hat is None else t_hat
  pre = np.zeros(n) if pre is None else pre
  t_next = np.concatenate([grid.timesteps[1:], [0.0]])
  rows = []  # (t, σ_eval, second, pre, dt)
  for k in range(n):
    s_next = grid.sigmas[k + 1]
    rows.append((t_hat[k], s_hat[k], False, pre[k], s_next - s_hat[k]))
    if s_next > 0:
      t_b = t_next[k] if k + 1 < n else t_of_sigma(s_next)
      rows.append((t_b, s_next, True, 0.0, s_next - s_hat[k]))
  t, s_eval, second, pre_c, dt = (np.asarray(c) for c in zip(*rows))
  return Heun(
    init_sigma=base.f32(1.0 if flow else sg.init_sigma(grid)),
    timesteps=base.f32(t),
    c_in=base.f32(sg.c_in(s_eval) if scale_input and not flow else np.ones_like(s_eval)),
    sigma_eval=base.f32(s_eval),
    second=jnp.asarray(second.astype(bool)),
    pre=base.f32(pre_c),
    dt=base.f32(dt),
    prediction=prediction,
    stochastic=bool(np.any(pre > 0)),
  )
