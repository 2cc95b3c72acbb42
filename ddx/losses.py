"""Training losses for discrete-time diffusion models.

* Mean-squared error on an eps, x0 or v target, averaged over all non-batch dimensions.
* Weightings: ``"uniform"`` (DDPM's L_simple) or ``"min_snr"`` (Min-SNR-gamma, arXiv
  2303.09556), expressed for the chosen target so that all targets optimise the same
  x0-space objective ``min(SNR, gamma) * |x0 - x0_hat|^2``:
  eps: ``min(SNR, gamma)/SNR``; x0: ``min(SNR, gamma)``; v: ``min(SNR, gamma)/(SNR + 1)``.
* The Improved-DDPM hybrid loss ``L_simple + vlb_weight * L_vlb`` (arXiv 2102.09672) for
  models with a learned_range variance output: the variance channels are trained by the
  variational bound with the mean's gradient stopped; ``L_vlb`` is estimated from the
  sampled t as ``T * L_t`` in bits per dimension (so ``vlb_weight = 1e-3``, T = 1000 gives the
  paper's weighting).

* EDM (Karras et al. 2022): ln σ ~ N(P_mean, P_std²), ``x = x0 + σ n``, and the
  preconditioned network's own target (`ddx.edm`), i.e. ``λ(σ) |D(x; σ) - x0|²`` with
  ``λ = (σ² + σ_d²) / (σ σ_d)²`` (`edm_loss`).
* Flow matching (rectified flow, Lipman et al. 2023; Liu et al. 2023; SD3): ``x_σ =
  (1 - σ) x0 + σ eps`` with σ in (0, 1) drawn uniform, logit-normal or shifted (`flow_draw`),
  and the velocity ``eps - x0`` regressed from the model given ``σ T`` (`flow_loss`).

Everything is per example: functions return [B] losses; reduce them where you shard.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddx import diffusion, edm
from ddx.schedules import Schedule

__all__ = [
  "WEIGHTINGS",
  "target",
  "snr_weight",
  "diffusion_loss",
  "training_loss",
  "draw_noise",
  "noised_loss",
  "vlb_terms",
  "normal_kl",
  "discretized_gaussian_log_likelihood",
  "KINDS",
  "FLOW_TIMESTEPS",
  "edm_draw",
  "edm_loss",
  "flow_draw",
  "flow_loss",
]

WEIGHTINGS = ("uniform", "min_snr")
KINDS = ("ddpm", "flow", "edm")  # the objectives: VP noise prediction, flow matching, EDM
FLOW_TIMESTEPS = ("uniform", "logit_normal")


def flow_draw(
  x0: jax.Array, key: jax.Array, *, timesteps: str = "uniform", mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """σ [B] and eps (x0's shape) for flow matching, from ``fold_in(key, 0)`` and ``fold_in(key, 1)``:
  σ uniform in (0, 1) or ``sigmoid(mean + std n)`` (logit-normal, SD3's default 0 / 1), then
  SD3's shift ``shift σ / (1 + (shift - 1) σ)`` (1 = none; > 1 spends more training at high noise)."""
  b = x0.shape[0]
  k_t = jax.random.fold_in(key, 0)
  if timesteps == "uniform":
    # the open interval: σ = 0 and σ = 1 are single points of no use to the model
    u = jax.random.uniform(k_t, (b,), jnp.float32, minval=1e-5, maxval=1.0 - 1e-5)
  elif timesteps == "logit_normal":
    u = jax.nn.sigmoid(mean + std * jax.random.normal(k_t, (b,), jnp.float32))
  else:
    raise ValueError(f"timesteps: unknown flow timestep distribution {timesteps!r}; expected one of {FLOW_TIMESTEPS}")
  sigma = shift * u / (1.0 + (shift - 1.0) * u)
  eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32)
  return sigma, eps


def flow_loss(model_fn: Callable, x0: jax.Array, sigma: jax.Array, eps: jax.Array, num_train: int) -> jax.Array:
  """Per-example ``|model(x_σ, σ T) - (eps - x0)|²`` (mean over the non-batch axes)."""
  s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
  x = (1.0 - s) * x0 + s * eps
  out = model_fn(x, sigma * num_train).astype(jnp.float32)
  return _mean_flat((out - (eps - x0)) ** 2)


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """Log-likelihood of data ``x`` in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2).

  The DDPM decoder L_0 (Ho et al. 2020, eq. 13), elementwise, in nats.
  """
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return jnp.where(
    x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12)))
  )


def snr_weight(sched: Schedule, t: jax.Array, prediction: str, weighting: str, gamma: float) -> jax.Array:
  """Per-example loss weight [B] for the given target (see module docstring)."""
  if weighting == "uniform":
    return jnp.ones(t.shape, jnp.float32)
  if weighting != "min_snr":
    raise ValueError(f"weighting: unknown {weighting!r}; expected one of {WEIGHTINGS}")
  s = diffusion.snr(sched, t)
  clipped = jnp.minimum(s, gamma)
  if prediction == "eps":
    return clipped / s
  if prediction == "x0":
    return clipped
  if prediction == "v":
    return clipped / (s + 1.0)
  raise ValueError(f"prediction: unknown {prediction!r}; expected one of {diffusion.PREDICTIONS}")


def target(sched: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array, prediction: str) -> jax.Array:
  """The regression target for ``prediction``: eps, x0 or v."""
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  if prediction == "v":
    return diffusion.velocity(sched, x0, t, eps)
  raise ValueError(f"prediction: unknown {prediction!r}; expected one of {diffusion.PREDICTIONS}")


def vlb_terms(sched: Schedule, x0, x_t, t, x0_pred, var_output) -> jax.Array:
  """Per-example variational-bound term L_t in bits/dim for a learned_range model.

  ``x0_pred`` is the model's (stop-gradient) x0 estimate, ``var_output`` its raw variance
  channels in [-1, 1]. t > 0: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)); t = 0: -log p(x0|x_1).
  """
  true_mean, _, true_logvar = diffusion.posterior_mean_variance(sched, x0, x_t, t)
  model_mean, _, _ = diffusion.posterior_mean_variance(sched, x0_pred, x_t, t)
  model_logvar = diffusion.model_log_variance(sched, t, "learned_range", var_output, like=x_t)
  kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / np.log(2.0)
  nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / np.log(2.0)
  return jnp.where(t == 0, nll, kl)


def diffusion_loss(
  sched: Schedule,
  model_output: jax.Array,
  x0: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  eps: jax.Array,
  *,
  prediction: str = "eps",
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  learned_variance: bool = False,
  vlb_weight: float = 1e-3,
) -> jax.Array:
  """Per-example training loss [B].

  Args:
    model_output: [B, ..., C] (or [B, ..., 2C] with ``learned_variance``: the last-axis second
      half holds the learned_range variance values in [-1, 1]; channels-last).
    x0, x_t, eps: [B, ..., C]; ``x_t = q_sample(sched, x0, t, eps)``.
    t: int [B].
  """
  out = model_output.astype(jnp.float32)
  if learned_variance:
    c = x0.shape[-1]
    if out.shape[-1] != 2 * c:
      raise ValueError(f"model_output: learned_variance needs {2 * c} output channels, got {out.shape[-1]}")
    out, var_out = out[..., :c], out[..., c:]
  elif out.shape != x0.shape:
    raise ValueError(f"model_output: shape {out.shape} does not match the data shape {x0.shape}")
  tgt = target(sched, x0, t, eps, prediction)
  mse = _mean_flat((out - tgt) ** 2)
  loss = snr_weight(sched, t, prediction, weighting, min_snr_gamma) * mse
  if learned_variance:
    a = diffusion._bcast(sched.alphas_cumprod[t], x_t)
    x0_pred, _ = diffusion.to_x0_eps(jax.lax.stop_gradient(out), x_t, a, prediction)
    loss = loss + vlb_weight * sched.num_timesteps * vlb_terms(sched, x0, x_t, t, x0_pred, var_out)
  return loss


def draw_noise(sched: Schedule, x0: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(t [B] int32, eps like x0)``: t ~ U{0..T-1} and eps ~ N(0, I) for the batch ``x0``.

  The key is split into (t, eps) streams with fold_in, so the draws for a global batch do
  not depend on how the batch is sharded, or on how a step splits it into micro-batches.
  """
  t = jax.random.randint(jax.random.fold_in(key, 0), (x0.shape[0],), 0, sched.num_timesteps)
  eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32).astype(x0.dtype)
  return t, eps


def noised_loss(
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  sched: Schedule,
  x0: jax.Array,
  t: jax.Array,
  eps: jax.Array,
  **loss_kwargs,
) -> jax.Array:
  """Noise ``x0`` to step ``t`` with ``eps`` and return the per-example loss [B] of
  ``model_fn(x_t, t) -> output`` (`diffusion_loss`'s keyword arguments)."""
  x_t = diffusion.q_sample(sched, x0, t, eps)
  return diffusion_loss(sched, model_fn(x_t, t), x0, x_t, t, eps, **loss_kwargs)


def training_loss(
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  sched: Schedule,
  x0: jax.Array,
  key: jax.Array,
  **loss_kwargs,
) -> jax.Array:
  """`draw_noise` from ``key``, then `noised_loss`: the per-example loss [B] of one batch."""
  t, eps = draw_noise(sched, x0, key)
  return noised_loss(model_fn, sched, x0, t, eps, **loss_kwargs)


def edm_draw(x0: jax.Array, key: jax.Array, *, p_mean: float = -1.2, p_std: float = 1.2) -> tuple[jax.Array, jax.Array]:
  """σ [B] (log-normal, EDM's P_mean / P_std) and n (x0's shape), from ``fold_in(key, 0 / 1)``."""
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(jax.random.fold_in(key, 0), (x0.shape[0],), jnp.float32))
  return sigma, jax.random.normal(jax.random.fold_in(key, 1), x0.shape, jnp.float32)


def edm_loss(net_fn: Callable, x0: jax.Array, sigma: jax.Array, n: jax.Array, sigma_data: float) -> jax.Array:
  """Per-example ``|F(c_in x, c_noise) - (x0 - c_skip x) / c_out|²`` for ``x = x0 + σ n``: EDM's
  ``λ(σ) |D - x0|²`` with its weighting folded in (both sides have unit variance)."""
  c_skip, c_out, c_in, c_noise = (c.reshape((-1,) + (1,) * (x0.ndim - 1)) for c in edm.coefficients(sigma, sigma_data))
  x = x0 + sigma.reshape(c_in.shape) * n
  out = net_fn(x * c_in, c_noise.reshape(-1)).astype(jnp.float32)
  return _mean_flat((out - (x0 - c_skip * x) / c_out) ** 2)
