"""The forward process, the posterior, parameterization conversions and SNR.

Pure functions of explicit arrays. Conventions (docs/samplers.md §2):

* ``t`` is an integer code index array of shape [B] (0 <= t < T); per-timestep coefficients
  are gathered at ``t`` and broadcast over the trailing dimensions of ``x`` ([B, ...]).
* ``x_t = sqrt(ab[t]) x0 + sqrt(1 - ab[t]) eps``;  ``v = sqrt(ab[t]) eps - sqrt(1 - ab[t]) x0``.
* The posterior q(x_{t-1} | x_t, x0) uses ``ab[-1] := 1``: at t = 0 its mean is x0 and its
  variance 0.

Per-timestep tables are computed once on the host in float64 from ``sched.f64`` and cast to
float32 (they become compile-time constants, so no float64 math runs on device).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddx.schedules import Schedule, _HostArrays

__all__ = [
  "PREDICTIONS",
  "VARIANCES",
  "q_sample",
  "velocity",
  "snr",
  "x0_from_eps",
  "eps_from_x0",
  "x0_from_v",
  "eps_from_v",
  "v_from_eps_x0",
  "to_x0_eps",
  "score_from_eps",
  "posterior_mean_variance",
  "model_log_variance",
]

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _bcast(coef: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] matching x's rank."""
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


@functools.lru_cache(maxsize=64)
def _tables(host: _HostArrays) -> dict[str, np.ndarray]:
  """float64 posterior tables over the full chain (index n = 0..T-1)."""
  b, ab, abp = host.betas, host.alphas_cumprod, host.alphas_cumprod_prev
  with np.errstate(divide="ignore", invalid="ignore"):
    var = b * (1.0 - abp) / (1.0 - ab)  # beta_tilde; 0 at n = 0
    # improved-diffusion / TF (CIFAR) clipping: element 0 replaced by element 1, so the log is
    # finite. It only matters for the n = 0 decoder term of the likelihood.
    logvar_small = np.log(np.concatenate([var[1:2], var[1:]])) if var.shape[0] > 1 else np.log(np.maximum(var, 1e-20))
    logvar_large = np.log(np.concatenate([var[1:2], b[1:]])) if var.shape[0] > 1 else np.log(b)
    coef1 = b * np.sqrt(abp) / (1.0 - ab)
    coef2 = (1.0 - abp) * np.sqrt(1.0 - b) / (1.0 - ab)
  return {
    "posterior_variance": var,
    "posterior_log_variance_clipped": logvar_small,
    "fixed_large_log_variance": logvar_large,
    "log_betas": np.log(b),
    "posterior_mean_coef1": coef1,
    "posterior_mean_coef2": coef2,
    "snr": ab / (1.0 - ab),
  }


def _gather(sched: Schedule, name: str, t: jax.Array) -> jax.Array:
  table = jnp.asarray(_tables(sched.f64)[name].astype(np.float32))
  return table[t]


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """Sample q(x_t | x0) with explicit noise: ``sqrt(ab[t]) x0 + sqrt(1-ab[t]) eps``.

  Args: x0, eps: [B, ...]; t: int [B]. Returns x_t [B, ...] in x0's dtype.
  """
  a = _bcast(sched.sqrt_alphas_cumprod[t], x0)
  s = _bcast(sched.sqrt_one_minus_alphas_cumprod[t], x0)
  return (a * x0 + s * eps).astype(x0.dtype)


def velocity(sched: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """The v target ``sqrt(ab[t]) eps - sqrt(1-ab[t]) x0`` (diffusers ``get_velocity``)."""
  a = _bcast(sched.sqrt_alphas_cumprod[t], x0)
  s = _bcast(sched.sqrt_one_minus_alphas_cumprod[t], x0)
  return a * eps - s * x0


def snr(sched: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ``ab[t] / (1 - ab[t])`` (inf where ab = 1 cannot happen: ab[0] < 1)."""
  return _gather(sched, "snr", t)


# --- parameterization conversions, written for scalar or broadcastable alpha ``a`` = ab[t] ---


def x0_from_eps(x: jax.Array, eps: jax.Array, a) -> jax.Array:
  """``(x - sqrt(1-a) eps) / sqrt(a)`` (diffusers' operation order)."""
  return (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def eps_from_x0(x: jax.Array, x0: jax.Array, a) -> jax.Array:
  """``(x - sqrt(a) x0) / sqrt(1-a)``."""
  return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def x0_from_v(x: jax.Array, v: jax.Array, a) -> jax.Array:
  """``sqrt(a) x - sqrt(1-a) v``."""
  return jnp.sqrt(a) * x - jnp.sqrt(1.0 - a) * v


def eps_from_v(x: jax.Array, v: jax.Array, a) -> jax.Array:
  """``sqrt(a) v + sqrt(1-a) x``."""
  return jnp.sqrt(a) * v + jnp.sqrt(1.0 - a) * x


def v_from_eps_x0(eps: jax.Array, x0: jax.Array, a) -> jax.Array:
  """``sqrt(a) eps - sqrt(1-a) x0``."""
  return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0


def to_x0_eps(output: jax.Array, x: jax.Array, a, prediction: str) -> tuple[jax.Array, jax.Array]:
  """Convert a model output of type ``prediction`` ("eps" | "x0" | "v") at x_t with
  ``a = ab[t]`` (scalar or broadcastable) into ``(x0_hat, eps_hat)``."""
  return to_x0_eps_sqrt(output, x, jnp.sqrt(a), jnp.sqrt(1.0 - a), prediction)


def to_x0_eps_sqrt(output: jax.Array, x: jax.Array, sqrt_a, sqrt_1ma, prediction: str) -> tuple[jax.Array, jax.Array]:
  """`to_x0_eps` from ``sqrt(a)`` and ``sqrt(1 - a)`` given separately.

  Samplers pass both from float64 host tables: ``sqrt(1 - a)`` computed from a float32 ``a``
  near t = 0 (1 - a ~ 1e-4) carries ~1e-4 relative error.
  """
  if prediction == "eps":
    return (x - sqrt_1ma * output) / sqrt_a, output
  if prediction == "x0":
    return output, (x - sqrt_a * output) / sqrt_1ma
  if prediction == "v":
    return sqrt_a * x - sqrt_1ma * output, sqrt_a * output + sqrt_1ma * x
  raise ValueError(f"prediction: unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def score_from_eps(eps: jax.Array, a) -> jax.Array:
  """``grad_x log p_t(x) = -eps / sqrt(1 - a)``."""
  return -eps / jnp.sqrt(1.0 - a)


# --- posterior and model variances over the full chain ---


def posterior_mean_variance(
  sched: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0).

  ``mean = c1[t] x0 + c2[t] x_t`` with ``c1 = beta sqrt(ab_prev)/(1-ab)``,
  ``c2 = (1-ab_prev) sqrt(alpha)/(1-ab)``; variance ``beta_tilde[t]`` (0 at t = 0); the
  log-variance has element 0 replaced by element 1 (improved-diffusion convention).
  Shapes: x0, x_t [B, ...]; t [B]; returns mean [B, ...], var and logvar [B, 1, ...].
  """
  c1 = _bcast(_gather(sched, "posterior_mean_coef1", t), x_t)
  c2 = _bcast(_gather(sched, "posterior_mean_coef2", t), x_t)
  var = _bcast(_gather(sched, "posterior_variance", t), x_t)
  logvar = _bcast(_gather(sched, "posterior_log_variance_clipped", t), x_t)
  return c1 * x0 + c2 * x_t, var, logvar


def model_log_variance(
  sched: Schedule, t: jax.Array, variance: str, var_output: jax.Array | None = None, *, like: jax.Array
) -> jax.Array:
  """Log-variance of p(x_{t-1} | x_t) on the full chain.

  * ``fixed_small``: log beta_tilde (clipped at t = 0 as in `posterior_mean_variance`).
  * ``fixed_large``: log beta (t = 0 entry replaced by log beta_tilde[1], as in the DDPM TF code).
  * ``learned_range``: ``frac log beta + (1-frac) log beta_tilde_clipped`` with
    ``frac = (var_output + 1)/2`` (improved-diffusion), var_output [B, ...] in [-1, 1].
  Returns [B, 1, ...] (fixed) or [B, ...] (learned_range).
  """
  if variance == "fixed_small":
    return _bcast(_gather(sched, "posterior_log_variance_clipped", t), like)
  if variance == "fixed_large":
    return _bcast(_gather(sched, "fixed_large_log_variance", t), like)
  if variance == "learned_range":
    if var_output is None:
      raise ValueError("var_output: learned_range needs the model's variance output")
    min_log = _bcast(_gather(sched, "posterior_log_variance_clipped", t), like)
    max_log = _bcast(_gather(sched, "log_betas", t), like)
    frac = (var_output + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log
  raise ValueError(f"variance: unknown variance type {variance!r}; expected one of {VARIANCES}")
