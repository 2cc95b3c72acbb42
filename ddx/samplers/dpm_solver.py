"""DPM-Solver++ multistep (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
``algorithm_type="dpmsolver++"``; docs/samplers.md §6.

With ``alpha_k = sqrt(ab[tau_k])``, ``sigma_k = sqrt(1 - ab[tau_k])``,
``lambda_k = log(alpha_k / sigma_k)``, ``h = lambda_{k+1} - lambda_k`` and the data prediction
``m_k`` (x0 from the model output, optionally dynamically thresholded):

    first order (= DDIM eta 0):  x_{k+1} = (sigma_{k+1}/sigma_k) x_k - alpha_{k+1} (e^{-h} - 1) m_k
    second order, D1 = (m_k - m_{k-1}) / r,  r = h_{k-1} / h:
      midpoint: ... - 0.5 alpha_{k+1} (e^{-h} - 1) D1
      heun:     ... + alpha_{k+1} ((e^{-h} - 1)/h + 1) D1

All coefficients are precomputed on the host in float64, so each step is
``x' = A x + B m_k + C (m_k - m_{k-1})``. ``final_sigma="zero"`` (diffusers >= 0.26 default)
ends at sigma 0 with a first-order step that returns m exactly (A = 0, B = 1, no log 0 inside
jit); ``"sigma_min"`` ends at ab[0]. The first step is first order; the last is first order
if ``lower_order_final`` and S < 15, or ``final_sigma="zero"``, or ``euler_at_final``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddx import diffusion
from ddx.samplers import base, grids
from ddx.schedules import Schedule

SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")


@struct.dataclass
class DPMSolverPP(base.Common):
  timesteps: jax.Array  # int32 [N]
  sqrt_alpha: jax.Array  # alpha_k = sqrt(ab[tau_k]) for the output conversion
  sqrt_one_minus_alpha: jax.Array  # sigma_k
  coef_x: jax.Array  # A_k
  coef_m: jax.Array  # B_k
  coef_d: jax.Array  # C_k (0 for first-order steps)
  prediction: str = struct.field(pytree_node=False, default="eps")
  x0_processing: base.X0Processing = struct.field(pytree_node=False, default=base.X0Processing())
  stochastic: bool = struct.field(pytree_node=False, default=False)

  def step(self, state: base.State, model_output: jax.Array, i, noise=None) -> base.State:
    del noise
    out, _ = base.split_output(model_output, state.x)
    m, _ = diffusion.to_x0_eps_sqrt(out, state.x, self.sqrt_alpha[i], self.sqrt_one_minus_alpha[i], self.prediction)
    # The update is written in x0 (data prediction) alone, so thresholding stays consistent.
    m = self.x0_processing(m)
    # state.x0 holds m_{k-1}; C_k = 0 on first-order steps, so its initial zeros never matter.
    x_next = self.coef_x[i] * state.x + self.coef_m[i] * m + self.coef_d[i] * (m - state.x0)
    return base.State(x=x_next, x0=m)


def make(
  sched: Schedule,
  num_steps: int,
  *,
  solver_order: int = 2,
  solver_type: str = "midpoint",
  spacing: str = "linspace",
  steps_offset: int = 0,
  timesteps=None,
  lower_order_final: bool = True,
  euler_at_final: bool = False,
  final_sigma: str = "zero",
  prediction: str = "eps",
  thresholding: bool = False,
  threshold_ratio: float = 0.995,
  threshold_max: float = 1.0,
  eta: float = 0.0,
) -> DPMSolverPP:
  """Build a DPM-Solver++ (1S / 2M) sampler with S model calls.

  Defaults follow diffusers' DPMSolverMultistepScheduler (order 2, midpoint, linspace spacing
  over S+1 points dropping 0, lower_order_final, final sigma zero). ``eta`` must be 0.
  """
  if eta != 0:
    raise ValueError(f"eta: DPM-Solver++ (multistep ODE solver) is deterministic; eta must be 0, got {eta!r}")
  if solver_order not in (1, 2):
    raise ValueError(f"solver_order: must be 1 or 2, got {solver_order!r}")
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"solver_type: unknown {solver_type!r}; expected one of {SOLVER_TYPES}")
  if final_sigma not in FINAL_SIGMAS:
    raise ValueError(f"final_sigma: unknown {final_sigma!r}; expected one of {FINAL_SIGMAS}")
  base.check_prediction(prediction)
  x0_proc = base.x0_processing(thresholding=thresholding, threshold_ratio=threshold_ratio, threshold_max=threshold_max)
  T = sched.num_timesteps
  ts = grids.validate(timesteps, T) if timesteps is not None else grids.dpm_solver(spacing, T, num_steps, steps_offset)
  base.check_zero_snr(prediction, sched.f64.alphas_cumprod[ts], "the DPM-Solver grid")
  ab = base.clamp_zero_snr(sched.f64.alphas_cumprod)
  a = ab[ts]
  n = ts.shape[0]
  alpha = np.sqrt(a)
  sigma = np.sqrt(1.0 - a)
  lam = np.log(alpha) - np.log(sigma)
  if final_sigma == "zero":
    alpha_next = np.concatenate([alpha[1:], [1.0]])
    sigma_next = np.concatenate([sigma[1:], [0.0]])
  else:
    alpha_next = np.concatenate([alpha[1:], [np.sqrt(ab[0])]])
    sigma_next = np.concatenate([sigma[1:], [np.sqrt(1.0 - ab[0])]])
  coef_x = np.zeros(n)
  coef_m = np.zeros(n)
  coef_d = np.zeros(n)
  for k in range(n):
    last = k == n - 1
    if last and final_sigma == "zero":
      coef_x[k], coef_m[k], coef_d[k] = 0.0, 1.0, 0.0  # exp(-inf) = 0: return m exactly
      continue
    lam_next = np.log(alpha_next[k]) - np.log(sigma_next[k])
    h = lam_next - lam[k]
    em1 = np.exp(-h) - 1.0
    coef_x[k] = sigma_next[k] / sigma[k]
    coef_m[k] = -alpha_next[k] * em1
    lower_final = last and (euler_at_final or (lower_order_final and n < 15))
    second = solver_order == 2 and k >= 1 and not lower_final
    if second:
      r = (lam[k] - lam[k - 1]) / h
      if solver_type == "midpoint":
        coef_d[k] = -0.5 * alpha_next[k] * em1 / r
      else:
        coef_d[k] = alpha_next[k] * (em1 / h + 1.0) / r
  return DPMSolverPP(
    timesteps=jnp.asarray(ts, jnp.int32),
    sqrt_alpha=base.f32(alpha),
    sqrt_one_minus_alpha=base.f32(sigma),
    coef_x=base.f32(coef_x),
    coef_m=base.f32(coef_m),
    coef_d=base.f32(coef_d),
    prediction=prediction,
    x0_processing=x0_proc,
  )
