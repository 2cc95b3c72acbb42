"""Linear multistep (LMS) in σ space (k-diffusion's ``sample_lms``, diffusers'
``LMSDiscreteScheduler``); docs/samplers.md §9.

One model call per step ``σ_k -> σ_{k+1}``. With the derivatives ``d_j = (x_j - x0_j) / σ_j``
of the last ``q = min(k + 1, order)`` steps, the step integrates their Lagrange interpolant
in σ exactly:

    x_{k+1} = x_k + Σ_{j<q} c_{k,j} d_{k-j},
    c_{k,j} = ∫_{σ_k}^{σ_{k+1}} Π_{m<q, m≠j} (τ - σ_{k-m}) / (σ_{k-j} - σ_{k-m}) dτ.

The coefficients are polynomial integrals, computed exactly on the host in float64 (the
reference integrates them numerically); inside the loop a step is a fixed-size weighted sum
over a ring of the last ``order - 1`` derivatives, so any order jits to one scan body.
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

MAX_ORDER = 4


class LMSState(NamedTuple):
  x: jax.Array
  x0: jax.Array
  ring: jax.Array  # [MAX_ORDER - 1, *x.shape]: ring[0] = d_{k-1}, ring[1] = d_{k-2}, ...


def coefficients(s: np.ndarray, order: int) -> np.ndarray:
  """float64 [S, MAX_ORDER]: ``c_{k,j}`` for the σ grid ``s`` [S + 1] (zero beyond q)."""
  n = s.shape[0] - 1
  c = np.zeros((n, MAX_ORDER))
  for k in range(n):
    q = min(k + 1, order)
    for j in range(q):
      poly = np.polynomial.Polynomial([1.0])
      for m in range(q):
        if m != j:
          poly = poly * np.polynomial.Polynomial([-s[k - m], 1.0]) / (s[k - j] - s[k - m])
      integral = poly.integ()
      c[k, j] = integral(s[k + 1]) - integral(s[k])
  return c


@struct.dataclass
class LMS(sg.SigmaCommon):
  init_sigma: jax.Array  # float32 []: sqrt(σ_0² + 1), the scale of x_T
  timesteps: jax.Array  # float32 [S]
  c_in: jax.Array
  sigma: jax.Array  # σ_k
  coef: jax.Array  # float32 [S, MAX_ORDER]
  prediction: str = struct.field(pytree_node=False, default="eps")
  stochastic: bool = struct.field(pytree_node=False, default=False)

  def init(self, x_T: jax.Array) -> LMSState:
    s = super().init(x_T)
    return LMSState(x=s.x, x0=s.x0, ring=jnp.zeros((MAX_ORDER - 1,) + s.x.shape, jnp.float32))

  def step(self, state: LMSState, model_output: jax.Array, i, noise=None) -> LMSState:
    del noise
    out, _ = base.split_output(model_output, state.x)
    x0 = sg.to_x0(out, state.x, self.sigma[i], self.prediction)
    d = sg.derivative(out, state.x, x0, self.sigma[i], self.prediction)
    c = self.coef[i]
    x_next = state.x + c[0] * d + jnp.tensordot(c[1:], state.ring, axes=1)
    ring = jnp.concatenate([d[None], state.ring[:-1]])
    return LMSState(x=x_next, x0=x0, ring=ring)


def make(
  sched: Schedule,
  num_steps: int,
  *,
  order: int = 4,
  spacing: str = "linspace",
  steps_offset: int = 0,
  sigmas: str | None = None,
  rho: float = 7.0,
  final_sigma: str = "zero",
  prediction: str = "eps",
) -> LMS:
  """LMS of ``order`` (1 to 4; 4 as diffusers' LMSDiscreteScheduler.step default) with S calls."""
  if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= MAX_ORDER:
    raise ValueError(f"order: must be an integer in [1, {MAX_ORDER}], got {order!r}")
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
  s = grid.sigmas[:-1]
  return LMS(
    timesteps=base.f32(grid.timesteps),
    c_in=base.f32(sg.c_in(s)),
    sigma=base.f32(s),
    coef=base.f32(coefficients(grid.sigmas, order)),
    init_sigma=base.f32(sg.init_sigma(grid)),
    prediction=prediction,
  )
