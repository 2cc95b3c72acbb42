"""UniPC multistep (Zhao et al. 2023), data prediction, B(h) = h (``bh1``) or e^h - 1 (``bh2``),
orders 1 to 3, with the UniC corrector, as diffusers' UniPCMultistepScheduler with
``predict_x0=True``; docs/samplers.md §10.

On the multistep grid of DPM-Solver++ (alpha_k, sigma_k, lambda_k = log(alpha_k/sigma_k)), with
``m_k`` the data prediction of call k, ``h = lambda_{k+1} - lambda_k`` and
``r_i = (lambda_{k-i} - lambda_k) / h``:

    UniP-p (predictor):  x_{k+1} = (sigma_{k+1}/sigma_k) x_k - alpha_{k+1} (e^{-h} - 1) m_k
                                   - alpha_{k+1} B(h) Σ_{i<p} ρ_i (m_{k-i} - m_k) / r_i
    UniC-p (corrector, at call k+1, once m_{k+1} is known):
                         x_{k+1}^c = the same update from x_k^c with the weights ρ^c over
                                     (m_{k-i} - m_k) / r_i and (m_{k+1} - m_k)

The ρ solve a small Vandermonde system in the r_i (``ρ = 1/2`` at order 2 for the
predictor and order 1 for the corrector). The model is evaluated at the *predicted* x_{k+1}:
its data prediction m_{k+1} is the one that the corrector and every later step use, while the
corrected x_{k+1}^c is what the next predictor starts from. Step k's order is
``min(order, k + 1)`` and, with ``lower_order_final``, at most S - k; the last step to σ = 0
(``final_sigma="zero"``) is first order and returns m exactly. Every update is a fixed
linear combination, precomputed on the host in float64:

    x^c = P_x x + Σ_j C_j m_{k+1-j}     (P_x = 1, C = 0 where the corrector is off)
    x'  = A x^c + Σ_j B_j m_{k-j}
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddx import diffusion
from ddx.samplers import base
from ddx.samplers import dpm_solver as dpm
from ddx.schedules import Schedule

SOLVER_TYPES = ("bh1", "bh2")
MAX_ORDER = 3


class UniPCState(NamedTuple):
  x: jax.Array  # the predicted sample the model is evaluated on next
  x0: jax.Array  # m_k, the latest data prediction
  hist: jax.Array  # [MAX_ORDER, *x.shape]: m_{k-1}, m_{k-2}, m_{k-3}
  last: jax.Array  # the corrected sample the last predictor started from


@struct.dataclass
class UniPC(base.Common):
  timesteps: jax.Array  # int32 [S] (float32 on a σ grid)
  sqrt_alpha: jax.Array
  sqrt_one_minus_alpha: jax.Array
  corr_x: jax.Array  # [S]: weight of the current x (1 where there is no corrector)
  corr_last: jax.Array  # [S]: weight of the sample the last predictor started from
  corr_m: jax.Array  # [S, 4]: weights of m_k (new), m_{k-1}, m_{k-2}, m_{k-3}
  pred_x: jax.Array  # [S]: weight of the corrected sample
  pred_m: jax.Array  # [S, 3]: weights of m_k, m_{k-1}, m_{k-2}
  prediction: str = struct.field(pytree_node=False, default="eps")
  x0_processing: base.X0Processing = struct.field(pytree_node=False, default=base.X0Processing())
  stochastic: bool = struct.field(pytree_node=False, default=False)

  def init(self, x_T: jax.Array) -> UniPCState:
    x = x_T.astype(jnp.float32)
    return UniPCState(x=x, x0=jnp.zeros_like(x), hist=jnp.zeros((MAX_ORDER,) + x.shape, jnp.float32), last=x)

  def step(self, state: UniPCState, model_output: jax.Array, i, noise=None) -> UniPCState:
    del noise
    out, _ = base.split_output(model_output, state.x)
    m, _ = diffusion.to_x0_eps_sqrt(out, state.x, self.sqrt_alpha[i], self.sqrt_one_minus_alpha[i], self.prediction)
    m = self.x0_processing(m)
    ms = jnp.concatenate([m[None], state.hist])  # m_k, m_{k-1}, m_{k-2}, m_{k-3}
    x_c = self.corr_x[i] * state.x + self.corr_last[i] * state.last + jnp.tensordot(self.corr_m[i], ms, axes=1)
    x_next = self.pred_x[i] * x_c + jnp.tensordot(self.pred_m[i], ms[:MAX_ORDER], axes=1)
    return UniPCState(x=x_next, x0=m, hist=ms[:MAX_ORDER], last=x_c)


def _rho(rks: list[float], h: float, order: int, solver_type: str, corrector: bool) -> tuple[np.ndarray, float, float]:
  """(ρ, h φ_1 = e^{-h} - 1, B(h)) of a UniP (corrector False) or UniC step of ``order``."""
  hh = -h
  h_phi_1 = np.expm1(hh)
  b_h = hh if solver_type == "bh1" else np.expm1(hh)
  r = np.asarray(list(rks) + [1.0])
  rows, b = [], []
  h_phi_k, fact = h_phi_1 / hh - 1.0, 1.0
  for i in range(1, order + 1):
    rows.append(r ** (i - 1))
    b.append(h_phi_k * fact / b_h)
    fact *= i + 1
    h_phi_k = h_phi_k / hh - 1.0 / fact
  R, b = np.asarray(rows), np.asarray(b)
  if corrector:
    rho = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
  elif order == 1:
    rho = np.zeros(0)
  else:
    rho = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
  return rho, h_phi_1, b_h


def make(
  sched: Schedule,
  num_steps: int,
  *,
  solver_order: int = 2,
  solver_type: str = "bh2",
  corrector: bool = True,
  disable_corrector=(),
  spacing: str = "linspace",
  steps_offset: int = 0,
  timesteps=None,
  sigmas: str | None = None,
  rho: float = 7.0,
  lower_order_final: bool = True,
  final_sigma: str = "zero",
  prediction: str = "eps",
  thresholding: bool = False,
  threshold_ratio: float = 0.995,
  threshold_max: float = 1.0,
) -> UniPC:
  """UniPC with S model calls; defaults follow diffusers' UniPCMultistepScheduler (order 2,
  bh2, linspace spacing over S+1 points dropping 0, lower_order_final, final sigma zero).
  ``corrector=False`` gives UniP alone; ``disable_corrector`` lists steps whose corrector is
  skipped (diffusers' semantics: the corrector applied at call k+1 belongs to step k)."""
  if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
    raise ValueError(f"solver_order: must be 1, 2 or 3 for UniPC, got {solver_order!r}")
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"solver_type: unknown {solver_type!r} for UniPC; expected one of {SOLVER_TYPES}")
  if final_sigma not in dpm.FINAL_SIGMAS:
    raise ValueError(f"final_sigma: unknown {final_sigma!r}; expected one of {dpm.FINAL_SIGMAS}")
  try:
    skip = {int(k) for k in disable_corrector}
  except (TypeError, ValueError):
    raise ValueError(f"disable_corrector: expected step indices, got {disable_corrector!r}") from None
  base.check_prediction(prediction)
  x0_proc = base.x0_processing(thresholding=thresholding, threshold_ratio=threshold_ratio, threshold_max=threshold_max)
  ts, alpha, sigma = dpm.grid(sched, num_steps, spacing, steps_offset, timesteps, sigmas, rho, prediction)
  ab = base.clamp_zero_snr(sched.f64.alphas_cumprod)
  n = ts.shape[0]
  if final_sigma == "zero":
    alpha_end, sigma_end = 1.0, 0.0
  else:
    alpha_end, sigma_end = np.sqrt(ab[0]), np.sqrt(1.0 - ab[0])
  alphas, sigmas_ = np.r_[alpha, alpha_end], np.r_[sigma, sigma_end]
  with np.errstate(divide="ignore"):
    lam = np.log(alphas) - np.log(sigmas_)  # lam[n] = inf at σ = 0
  orders = []
  for k in range(n):
    p = min(solver_order, n - k) if lower_order_final else solver_order
    p = min(p, k + 1)
    if k == n - 1 and final_sigma == "zero":
      p = 1
    orders.append(p)
  corr_x, corr_last = np.ones(n), np.zeros(n)
  corr_m, pred_x, pred_m = np.zeros((n, MAX_ORDER + 1)), np.zeros(n), np.zeros((n, MAX_ORDER))
  for k in range(n):
    # the corrector of step k-1, applied now that m_k is known
    if corrector and k >= 1 and (k - 1) not in skip:
      p, j = orders[k - 1], k - 1  # its order, and its start point
      h = lam[k] - lam[j]
      rks = [(lam[j - i] - lam[j]) / h for i in range(1, p)]
      rho_c, h_phi_1, b_h = _rho(rks, h, p, solver_type, corrector=True)
      a_t = alphas[k]
      corr_x[k], corr_last[k] = 0.0, sigmas_[k] / sigmas_[j]
      corr_m[k, 1] += -a_t * h_phi_1  # m0 = m_{k-1}
      for i in range(1, p):  # D1_i = (m_{k-1-i} - m_{k-1}) / r_i
        w = -a_t * b_h * rho_c[i - 1] / rks[i - 1]
        corr_m[k, 1 + i] += w
        corr_m[k, 1] -= w
      w = -a_t * b_h * rho_c[-1]  # D1_t = m_k - m_{k-1}
      corr_m[k, 0] += w
      corr_m[k, 1] -= w
    # the predictor of step k
    p = orders[k]
    if k == n - 1 and final_sigma == "zero":
      pred_m[k, 0] = 1.0  # σ' = 0: x' = m_k exactly
      continue
    h = lam[k + 1] - lam[k]
    rks = [(lam[k - i] - lam[k]) / h for i in range(1, p)]
    rho_p, h_phi_1, b_h = _rho(rks, h, p, solver_type, corrector=False)
    a_t = alphas[k + 1]
    pred_x[k] = sigmas_[k + 1] / sigmas_[k]
    pred_m[k, 0] = -a_t * h_phi_1
    for i in range(1, p):
      w = -a_t * b_h * rho_p[i - 1] / rks[i - 1]
      pred_m[k, i] += w
      pred_m[k, 0] -= w
  return UniPC(
    timesteps=base.f32(ts) if sigmas is not None else jnp.asarray(ts, jnp.int32),
    sqrt_alpha=base.f32(alpha),
    sqrt_one_minus_alpha=base.f32(sigma),
    corr_x=base.f32(corr_x),
    corr_last=base.f32(corr_last),
    corr_m=base.f32(corr_m),
    pred_x=base.f32(pred_x),
    pred_m=base.f32(pred_m),
    prediction=prediction,
    x0_processing=x0_proc,
  )
