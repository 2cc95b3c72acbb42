"""Noise-level (σ) grids and the σ-space convention of the Euler-family samplers; docs/samplers.md §9.

A variance-preserving sample ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` is, rescaled by
``sqrt(1 + σ²)`` with ``σ = sqrt((1 - ab) / ab)``, the variance-exploding sample
``x_σ = x0 + σ eps``. The σ-space samplers (Euler, Euler ancestral, Heun, LMS) integrate in
``x_σ``, where the probability-flow ODE is ``dx/dσ = (x - x0(x, σ)) / σ``. The model still sees
what it was trained on: ``x_σ / sqrt(1 + σ²)`` and the timestep ``t(σ)``.

A grid is S noise levels ``σ_0 > ... > σ_{S-1}`` followed by a final level (0, or the
schedule's smallest σ), and S float timesteps for the model:

* ``sigmas=None``: the σ of a timestep spacing (``linspace``, ``leading``, ``trailing``,
  as diffusers' Euler-family schedulers, where ``linspace`` timesteps are not rounded), linear
  interpolation of σ between integer timesteps;
* ``"karras"``: ``(σ_max^(1/ρ) + r (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ``, r = 0..1 in S points
  (Karras et al. 2022, ρ = 7);
* ``"exponential"``: log-uniform between σ_max and σ_min;
* ``"beta"``: ``σ_min + F⁻¹(1 - r) (σ_max - σ_min)`` with F the Beta(0.6, 0.6) distribution
  function (Lee et al. 2024);

where σ_max and σ_min are the first and last σ of the spacing's grid. For the three
re-spaced grids the model's timestep is ``t(σ)``: the piecewise-linear interpolation of the
training timesteps in log σ (as diffusers' ``_sigma_to_t``).

Everything here is host-side float64 numpy; samplers cast their tables to float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ddx.samplers import base, grids
from ddx.schedules import Schedule

SPACINGS = ("linspace", "leading", "trailing")
GRIDS = ("karras", "exponential", "beta")
FINAL_SIGMAS = ("zero", "sigma_min")


def schedule_sigmas(sched: Schedule) -> np.ndarray:
  """float64 [T]: ``σ_t = sqrt((1 - ab_t) / ab_t)``; a zero-terminal-SNR ``ab = 0`` is
  replaced by 2^-24 (as diffusers does) so that σ stays finite."""
  ab = base.clamp_zero_snr(sched.f64.alphas_cumprod)
  return np.sqrt((1.0 - ab) / ab)


def spacing_timesteps(spacing: str, num_train: int, num_steps: int, steps_offset: int = 0) -> np.ndarray:
  """float64 [S], decreasing: the Euler-family schedulers' timesteps (``linspace`` unrounded)."""
  if spacing not in SPACINGS:
    raise ValueError(f"spacing: unknown spacing {spacing!r} for a σ-space sampler; expected one of {SPACINGS}")
  if not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
    raise ValueError(f"steps_offset: must be an integer >= 0, got {steps_offset!r}")
  if steps_offset and spacing != "leading":
    raise ValueError(f"steps_offset: only applies to spacing='leading', got spacing={spacing!r}")
  if spacing == "linspace":
    grids._check_counts(num_train, num_steps)
    return np.linspace(0.0, num_train - 1, num_steps)[::-1].copy()
  if spacing == "leading":
    return grids.leading(num_train, num_steps, steps_offset).astype(np.float64)
  return grids.trailing(num_train, num_steps).astype(np.float64)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Timestep of each σ: linear in log σ between the two training timesteps around it,
  clamped to [0, T-1] (diffusers ``_sigma_to_t``)."""
  sigma = np.asarray(sigma, np.float64)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  # log_sigmas increases with t: the bracketing pair is (low, low + 1)
  low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, log_sigmas.shape[0] - 2)
  lo, hi = log_sigmas[low], log_sigmas[low + 1]
  w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
  return (1.0 - w) * low + w * (low + 1)


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
  ramp = np.linspace(0.0, 1.0, n)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))


def beta(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
  from scipy import stats  # noqa: PLC0415 -- a slow import that only this grid needs (scikit-learn brings scipy)

  return sigma_min + stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, n), a, b) * (sigma_max - sigma_min)


@dataclasses.dataclass(frozen=True)
class Grid:
  """``sigmas`` float64 [S + 1] (decreasing, the last the final level), ``timesteps`` float64 [S]."""

  sigmas: np.ndarray
  timesteps: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


def make(
  sched: Schedule,
  num_steps: int,
  *,
  spacing: str = "linspace",
  steps_offset: int = 0,
  sigmas: str | None = None,
  rho: float = 7.0,
  final_sigma: str = "zero",
  prediction: str | None = None,
) -> Grid:
  """The σ grid of S = ``num_steps`` steps for ``sched`` (see the module docstring);
  ``prediction``, if given, is checked too (the σ-space samplers' one entry point)."""
  if prediction is not None:
    base.check_prediction(prediction)
  if sigmas is not None and sigmas not in GRIDS:
    raise ValueError(f"sigmas: unknown noise-level grid {sigmas!r}; expected None or one of {GRIDS}")
  if final_sigma not in FINAL_SIGMAS:
    raise ValueError(f"final_sigma: unknown {final_sigma!r}; expected one of {FINAL_SIGMAS}")
  if not (isinstance(rho, (int, float)) and np.isfinite(rho) and rho > 0):
    raise ValueError(f"rho: must be a finite number > 0, got {rho!r}")
  if rho != 7.0 and sigmas != "karras":
    raise ValueError(f"rho: only applies to sigmas='karras', got sigmas={sigmas!r}")
  ts = spacing_timesteps(spacing, sched.num_timesteps, num_steps, steps_offset)
  table = schedule_sigmas(sched)
  s = np.interp(ts, np.arange(table.shape[0]), table)
  if sigmas is not None:
    lo, hi = float(s[-1]), float(s[0])
    s = {"karras": lambda: karras(lo, hi, num_steps, rho), "exponential": lambda: exponential(lo, hi, num_steps)}.get(
      sigmas, lambda: beta(lo, hi, num_steps)
    )()
    ts = sigma_to_t(s, np.log(table))
  last = table[0] if final_sigma == "sigma_min" else 0.0
  if num_steps > 1 and np.any(np.diff(s) >= 0):
    raise ValueError(f"num_steps: the {sigmas or spacing} grid with S={num_steps} repeats a noise level")
  # final_sigma="sigma_min" after a grid that ends at σ(t=0) repeats that level: a step of
  # length 0 (the model is called, x does not move), as in the reference.
  if s[-1] < last * (1.0 - 1e-9):  # the Karras formula lands on σ_min up to round-off
    raise ValueError(f"final_sigma: {final_sigma!r} ({last:.4g}) is above the grid's last level {s[-1]:.4g}")
  return Grid(sigmas=np.concatenate([s, [last]]), timesteps=ts)


def to_x0(out: jax.Array, x: jax.Array, sigma, prediction: str) -> jax.Array:
  """x0 from a model output at noise level σ, for a σ-space sample ``x = x0 + σ eps`` (or, with
  ``prediction="flow"``, a rectified-flow sample ``x = (1 - σ) x0 + σ eps`` and the velocity
  ``eps - x0``)."""
  if prediction in ("eps", "flow"):
    return x - sigma * out
  if prediction == "x0":
    return out
  # v = a eps - s x0 on the model's input x / sqrt(1 + σ²), with a = 1/sqrt(1+σ²), s = σ a
  return out * (-sigma / jnp.sqrt(sigma * sigma + 1.0)) + x / (sigma * sigma + 1.0)


def derivative(out: jax.Array, x: jax.Array, x0: jax.Array, sigma, prediction: str) -> jax.Array:
  """The ODE derivative ``d = (x - x0) / σ``, written per prediction so that float32 does not
  lose it to cancellation at small σ: eps gives ``d = eps`` and v gives
  ``d = σ x / (σ² + 1) + v / sqrt(σ² + 1)`` exactly; only x0 prediction divides a difference."""
  if prediction in ("eps", "flow"):  # dx/dσ of the flow is its velocity
    return out
  if prediction == "v":
    return sigma * x / (sigma * sigma + 1.0) + out / jnp.sqrt(sigma * sigma + 1.0)
  return (x - x0) / sigma


class SigmaCommon(base.Common):
  """What the σ-space samplers share: the state is ``x_σ``; x_T (standard normal) is scaled by
  ``sqrt(σ_0² + 1)``, the standard deviation of ``x_σ`` at σ_0 for unit-variance data; the
  model gets ``x_σ / sqrt(σ² + 1)`` and a float32 timestep. Subclasses have the fields
  ``timesteps`` (float32 [N]), ``c_in`` (float32 [N]) and ``init_sigma`` (float32 [])."""

  def init(self, x_T: jax.Array) -> base.State:
    x = x_T.astype(jnp.float32) * self.init_sigma
    return base.State(x=x, x0=jnp.zeros_like(x))

  def model_input(self, state, i, noise):
    del noise
    return state.x * self.c_in[i], self.timesteps[i]


def init_sigma(grid: Grid) -> float:
  return float(np.sqrt(grid.sigmas[0] ** 2 + 1.0))


def c_in(sigmas: np.ndarray) -> np.ndarray:
  return 1.0 / np.sqrt(np.asarray(sigmas, np.float64) ** 2 + 1.0)


def check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
  """One-line errors for the stochastic-churn knobs (Karras et al. 2022, Algorithm 2)."""
  if not (np.isfinite(s_churn) and s_churn >= 0):
    raise ValueError(f"s_churn: must be a finite number >= 0, got {s_churn!r}")
  if not (np.isfinite(s_tmin) and s_tmin >= 0):
    raise ValueError(f"s_tmin: must be a finite number >= 0, got {s_tmin!r}")
  if not (s_tmax >= s_tmin):
    raise ValueError(f"s_tmax: must be >= s_tmin ({s_tmin}), got {s_tmax!r}")
  if not (np.isfinite(s_noise) and s_noise > 0):
    raise ValueError(f"s_noise: must be a finite number > 0, got {s_noise!r}")


def churn(grid: Grid, sched: Schedule, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
  """Per step: ``(σ̂, model timestep at σ̂, noise coefficient)`` float64 [S] each. Step k raises
  the level to ``σ̂ = σ_k (1 + γ_k)``, ``γ_k = min(s_churn / S, √2 - 1)`` where
  ``s_tmin <= σ_k <= s_tmax`` (else 0), by adding ``s_noise sqrt(σ̂² - σ_k²) z`` before the
  model call (k-diffusion's ``sample_euler`` / ``sample_heun``)."""
  check_churn(s_churn, s_tmin, s_tmax, s_noise)
  s = grid.sigmas[:-1]
  gamma = np.where((s >= s_tmin) & (s <= s_tmax), min(s_churn / grid.num_steps, 2.0**0.5 - 1.0), 0.0)
  s_hat = s * (1.0 + gamma)
  t_hat = np.where(gamma > 0, sigma_to_t(s_hat, np.log(schedule_sigmas(sched))), grid.timesteps)
  return s_hat, t_hat, s_noise * np.sqrt(np.maximum(s_hat**2 - s**2, 0.0))
