"""DPM-Solver++ multistep (Lu et al. 2022), ODE and SDE, orders 1 to 3, as diffusers'
DPMSolverMultistepScheduler with ``algorithm_type="dpmsolver++"`` / ``"sde-dpmsolver++"``;
docs/samplers.md §6.

With ``alpha_k``, ``sigma_k`` the signal and noise scales of grid point k (``sqrt(ab)``,
``sqrt(1 - ab)``; or ``1/sqrt(σ²+1)``, ``σ/sqrt(σ²+1)`` on a Karras / exponential / beta σ
grid), ``lambda_k = log(alpha_k / sigma_k)``, ``h = lambda_{k+1} - lambda_k`` and the data
predictions ``m_k`` (x0 from the model output, optionally dynamically thresholded):

    ODE, first order (= DDIM eta 0):  x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) m_k
    SDE, first order:                 x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) m_k
                                           + sigma' sqrt(1 - e^{-2h}) z
    higher orders add ``c1 D1`` (second) and ``c1 D1 + c2 D2`` (third), with
    ``D1 = (m_k - m_{k-1}) / r0`` (second order) or its third-order extrapolation, ``D2`` the
    divided second difference, r0 = h_{k-1} / h, r1 = h_{k-2} / h (see the docs for c1, c2).

All coefficients are precomputed on the host in float64, so each step is
``x' = A x + B m_k + C (m_k - m_{k-1}) + E (m_{k-1} - m_{k-2}) + N z``. ``final_sigma="zero"``
(diffusers >= 0.26 default) ends at sigma 0 with a first-order step that returns m exactly
(A = 0, B = 1, no log 0 inside jit); ``"sigma_min"`` ends at ab[0]. Step k's order is at
most k + 1; the last step is first order if ``lower_order_final`` and S < 15, or
``final_sigma="zero"``, or ``euler_at_final``; the one before it at most second order if
``lower_order_final`` and S < 15 (diffusers' rules).

One deliberate difference: diffusers' third-order SDE update weights D2 by
``alpha' ((1 - e^{-2h} - 2h) / (2h)^2 - 0.5)``, which tends to -alpha' as h -> 0 where the
exact integral tends to 0 (it reduces the method to first order); ddx uses the exact weight
``alpha' (0.5 - (e^{-2h} - 1 + 2h) / (2h)^2)``, the ODE's with h -> 2h (docs/samplers.md §7).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddx import diffusion
from ddx.samplers import base, grids
from ddx.samplers import sigmas as sg
from ddx.schedules import Schedule

SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")
ALGORITHMS = ("ode", "sde")


class DPMState(NamedTuple):
  x: jax.Array  # the current sample
  x0: jax.Array  # m_k, the latest data prediction
  prev: jax.Array  # m_{k-1}


@struct.dataclass
class DPMSolverPP(base.Common):
  timesteps: jax.Array  # int32 [N]; float32 on a σ grid (``sigmas=``)
  sqrt_alpha: jax.Array  # alpha_k for the output conversion
  sqrt_one_minus_alpha: jax.Array  # sigma_k
  coef_x: jax.Array  # A_k
  coef_m: jax.Array  # B_k
  coef_d: jax.Array  # C_k (0 on first-order steps)
  coef_e: jax.Array  # E_k (0 below third order)
  coef_z: jax.Array  # N_k (0 for the ODE)
  prediction: str = struct.field(pytree_node=False, default="eps")
  x0_processing: base.X0Processing = struct.field(pytree_node=False, default=base.X0Processing())
  stochastic: bool = struct.field(pytree_node=False, default=False)

  def init(self, x_T: jax.Array) -> DPMState:
    s = super().init(x_T)
    return DPMState(x=s.x, x0=s.x0, prev=s.x0)

  def step(self, state: DPMState, model_output: jax.Array, i, noise=None) -> DPMState:
    out, _ = base.split_output(model_output, state.x)
    m, _ = diffusion.to_x0_eps_sqrt(out, state.x, self.sqrt_alpha[i], self.sqrt_one_minus_alpha[i], self.prediction)
    # The update is written in x0 (data prediction) alone, so thresholding stays consistent.
    m = self.x0_processing(m)
    # C_k = 0 on first-order steps and E_k = 0 below third order: the initial zeros never matter.
    x_next = (
      self.coef_x[i] * state.x
      + self.coef_m[i] * m
      + self.coef_d[i] * (m - state.x0)
      + self.coef_e[i] * (state.x0 - state.prev)
    )
    if noise is not None:
      x_next = x_next + self.coef_z[i] * noise
    return DPMState(x=x_next, x0=m, prev=state.x0)


def weights(h: float, sde: bool) -> tuple[float, float, float, float]:
  """Per unit alpha', the weights of D0, of D1 (second order: midpoint, heun) and of D2:
  ``∫_0^h w(u) p(u/h) du`` with ``w(u) = e^{-(h-u)}`` (ODE) or ``2 e^{-2(h-u)}`` (SDE) and
  ``p = 1, s, s²/2`` (the midpoint rule takes half the D0 weight for D1)."""
  hh = 2.0 * h if sde else h  # the SDE's weights are the ODE's at twice the step
  em = np.expm1(-hh)  # e^{-hh} - 1
  return -em, -0.5 * em, em / hh + 1.0, 0.5 - (em + hh) / hh**2


def grid(sched: Schedule, num_steps, spacing, steps_offset, timesteps, sigma_grid, rho, prediction):
  """The multistep solvers' grid (DPM-Solver++, UniPC): ``(timesteps [S], alpha_k, sigma_k)``,
  the timesteps int64 (or float64 on a σ grid), alpha and sigma float64 [S]."""
  T = sched.num_timesteps
  if sigma_grid is not None:
    if timesteps is not None:
      raise ValueError(f"timesteps: give either timesteps or sigmas={sigma_grid!r}, not both")
    if sigma_grid not in sg.GRIDS:
      raise ValueError(f"sigmas: unknown noise-level grid {sigma_grid!r}; expected None or one of {sg.GRIDS}")
    if not (isinstance(rho, (int, float)) and np.isfinite(rho) and rho > 0):
      raise ValueError(f"rho: must be a finite number > 0, got {rho!r}")
    grids._check_counts(T, num_steps)
    table = sg.schedule_sigmas(sched)
    lo, hi = float(table[0]), float(table[-1])  # the whole schedule's range (diffusers)
    s = {"karras": lambda: sg.karras(lo, hi, num_steps, rho), "exponential": lambda: sg.exponential(lo, hi, num_steps)}
    s = s.get(sigma_grid, lambda: sg.beta(lo, hi, num_steps))()
    # The model is told the exact (float) timestep of the level the solver uses. diffusers
    # rounds it on the Karras grid and truncates it on the others, so that the model is
    # evaluated at another noise level than the update assumes (docs/samplers.md §7).
    ts = sg.sigma_to_t(s, np.log(table))
    base.check_zero_snr(prediction, sched.f64.alphas_cumprod[np.round(ts).astype(int)], "the DPM-Solver grid")
    alpha = 1.0 / np.sqrt(s**2 + 1.0)
    return ts, alpha, s * alpha
  if rho != 7.0:
    raise ValueError(f"rho: only applies to sigmas='karras', got sigmas={sigma_grid!r}")
  ts = grids.validate(timesteps, T) if timesteps is not None else grids.dpm_solver(spacing, T, num_steps, steps_offset)
  base.check_zero_snr(prediction, sched.f64.alphas_cumprod[ts], "the DPM-Solver grid")
  a = base.clamp_zero_snr(sched.f64.alphas_cumprod)[ts]
  return ts, np.sqrt(a), np.sqrt(1.0 - a)


def make(
  sched: Schedule,
  num_steps: int,
  *,
  solver_order: int = 2,
  solver_type: str = "midpoint",
  algorithm: str = "ode",
  spacing: str = "linspace",
  steps_offset: int = 0,
  timesteps=None,
  sigmas: str | None = None,
  rho: float = 7.0,
  lower_order_final: bool = True,
  euler_at_final: bool = False,
  final_sigma: str = "zero",
  prediction: str = "eps",
  thresholding: bool = False,
  threshold_ratio: float = 0.995,
  threshold_max: float = 1.0,
  eta: float = 0.0,
) -> DPMSolverPP:
  """Build a DPM-Solver++ sampler (orders 1-3, ODE or SDE) with S model calls.

  Defaults follow diffusers' DPMSolverMultistepScheduler (order 2, midpoint, ODE, linspace
  spacing over S+1 points dropping 0, lower_order_final, final sigma zero). ``eta`` must be
  0 (the SDE variant is ``algorithm="sde"``). ``sigmas`` picks a Karras / exponential / beta
  grid over the schedule's whole σ range; the model's timestep is then the float t(σ).
  """
  if eta != 0:
    raise ValueError(f"eta: DPM-Solver++ takes no eta; for its stochastic variant use algorithm='sde', got eta={eta!r}")
  if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
    raise ValueError(f"solver_order: must be 1, 2 or 3, got {solver_order!r}")
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"solver_type: unknown {solver_type!r}; expected one of {SOLVER_TYPES}")
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm: unknown {algorithm!r}; expected one of {ALGORITHMS}")
  if final_sigma not in FINAL_SIGMAS:
    raise ValueError(f"final_sigma: unknown {final_sigma!r}; expected one of {FINAL_SIGMAS}")
  base.check_prediction(prediction)
  x0_proc = base.x0_processing(thresholding=thresholding, threshold_ratio=threshold_ratio, threshold_max=threshold_max)
  ts, alpha, sigma = grid(sched, num_steps, spacing, steps_offset, timesteps, sigmas, rho, prediction)
  ab = base.clamp_zero_snr(sched.f64.alphas_cumprod)
  n = ts.shape[0]
  sde = algorithm == "sde"
  lam = np.log(alpha) - np.log(sigma)
  if final_sigma == "zero":
    alpha_next = np.concatenate([alpha[1:], [1.0]])
    sigma_next = np.concatenate([sigma[1:], [0.0]])
  else:
    alpha_next = np.concatenate([alpha[1:], [np.sqrt(ab[0])]])
    sigma_next = np.concatenate([sigma[1:], [np.sqrt(1.0 - ab[0])]])
  coef = np.zeros((5, n))  # A, B, C, E, N
  for k in range(n):
    last = k == n - 1
    if last and final_sigma == "zero":
      coef[:, k] = (0.0, 1.0, 0.0, 0.0, 0.0)  # exp(-inf) = 0: return m exactly
      continue
    h = np.log(alpha_next[k]) - np.log(sigma_next[k]) - lam[k]
    b0, c_mid, c_heun, c2 = (alpha_next[k] * w for w in weights(h, sde))
    coef[0, k] = sigma_next[k] / sigma[k] * (np.exp(-h) if sde else 1.0)
    coef[1, k] = b0
    if sde:
      coef[4, k] = sigma_next[k] * np.sqrt(-np.expm1(-2.0 * h))
    lower_final = last and (euler_at_final or (lower_order_final and n < 15))
    lower_second = k == n - 2 and lower_order_final and n < 15
    if solver_order == 1 or k < 1 or lower_final:
      order = 1
    else:
      order = 2 if (solver_order == 2 or k < 2 or lower_second) else 3
    if order == 2:
      r0 = (lam[k] - lam[k - 1]) / h
      coef[2, k] = (c_mid if solver_type == "midpoint" else c_heun) / r0
    elif order == 3:
      # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1), D1_0 = (m0-m1)/r0, D1_1 = (m1-m2)/r1
      r0 = (lam[k] - lam[k - 1]) / h
      r1 = (lam[k - 1] - lam[k - 2]) / h
      w0 = c_heun * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1)
      w1 = -c_heun * r0 / (r0 + r1) - c2 / (r0 + r1)
      coef[2, k], coef[3, k] = w0 / r0, w1 / r1
  return DPMSolverPP(
    timesteps=base.f32(ts) if sigmas is not None else jnp.asarray(ts, jnp.int32),
    sqrt_alpha=base.f32(alpha),
    sqrt_one_minus_alpha=base.f32(sigma),
    coef_x=base.f32(coef[0]),
    coef_m=base.f32(coef[1]),
    coef_d=base.f32(coef[2]),
    coef_e=base.f32(coef[3]),
    coef_z=base.f32(coef[4]),
    prediction=prediction,
    x0_processing=x0_proc,
    stochastic=sde,
  )
