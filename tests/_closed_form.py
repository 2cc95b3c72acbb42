"""Closed-form optimal predictors used as oracle models.

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` (d dims) and ``x_t = sqrt(a) x0 + sqrt(1-a) eps``,
the exact posterior-mean predictors are, with ``v_k = a s_k^2 + 1 - a``,
``r_k ∝ w_k N(x; sqrt(a) mu_k, v_k I)``,
``eps*(x) = sum_k r_k sqrt(1-a) (x - sqrt(a) mu_k) / v_k`` and
``x0*(x) = sum_k r_k [mu_k + sqrt(a) s_k^2 (x - sqrt(a) mu_k) / v_k]``.
A single component is the Gaussian oracle; s_k = 0 gives point masses. A float timestep (the
σ-space samplers') is the level whose log σ interpolates linearly between integer timesteps.
"""

import jax
import jax.numpy as jnp
import numpy as np


class Mixture:
  """Model functions ``(x, t) -> eps* | x0* | v*`` for a Gaussian mixture; x is [B, d]."""

  def __init__(self, sched, weights, means, stds):
    self.ab = sched.alphas_cumprod
    ab = np.clip(sched.f64.alphas_cumprod, 2.0**-24, None)
    self.log_sigmas = jnp.asarray(0.5 * np.log((1.0 - ab) / ab), jnp.float32)
    self.w = jnp.asarray(weights, jnp.float32)
    self.mu = jnp.asarray(means, jnp.float32).reshape(len(weights), -1)  # [K, d]
    self.s2 = jnp.asarray(stds, jnp.float32) ** 2  # [K]

  def _alpha(self, t):
    if jnp.issubdtype(t.dtype, jnp.integer):
      return self.ab[t]
    s = jnp.exp(jnp.interp(t, jnp.arange(self.log_sigmas.shape[0], dtype=jnp.float32), self.log_sigmas))
    return 1.0 / (1.0 + s * s)

  def _parts(self, x, t):
    a = self._alpha(t)[:, None, None]  # [B, 1, 1]
    d = x.shape[-1]
    diff = x[:, None, :] - jnp.sqrt(a) * self.mu[None]  # [B, K, d]
    v = a * self.s2[None, :, None] + 1 - a  # [B, K, 1]
    logr = jnp.log(self.w)[None] - jnp.sum(diff**2 / (2 * v), -1) - 0.5 * d * jnp.log(v[..., 0])
    r = jax.nn.softmax(logr, axis=-1)[..., None]  # [B, K, 1]
    return a, diff, v, r

  def eps(self, x, t):
    a, diff, v, r = self._parts(x, t)
    return jnp.sum(r * jnp.sqrt(1 - a) * diff / v, axis=1)

  def x0(self, x, t):
    a, diff, v, r = self._parts(x, t)
    return jnp.sum(r * (self.mu[None] + jnp.sqrt(a) * self.s2[None, :, None] * diff / v), axis=1)

  def v(self, x, t):
    a = self._alpha(t)[:, None]
    return jnp.sqrt(a) * self.eps(x, t) - jnp.sqrt(1 - a) * self.x0(x, t)

  def fn(self, prediction):
    return {"eps": self.eps, "x0": self.x0, "v": self.v}[prediction]


def gaussian_ddim_gain(ab: np.ndarray, ts: np.ndarray, final: float, s2: float) -> float:
  """prod over DDIM eta=0 steps of g = (sqrt(a a') s^2 + sqrt((1-a)(1-a'))) / (a s^2 + 1 - a)."""
  a = ab[ts]
  ap = np.r_[a[1:], final]
  g = (np.sqrt(a * ap) * s2 + np.sqrt((1 - a) * (1 - ap))) / (a * s2 + 1 - a)
  return float(np.prod(g))


class FullGaussian:
  """Exact predictors for Gaussian data ``N(mu, Sigma)`` with a full covariance; x is [B, d].

  With ``Sigma = U diag(lam) U^T`` and ``y = U^T (x_t - sqrt(a) mu)``, the marginal of x_t is
  ``N(sqrt(a) mu, a Sigma + (1 - a) I)`` and ``eps*(x, t) = sqrt(1-a) U (y / (a lam + 1 - a))``.
  Along the probability-flow ODE each eigen-coordinate keeps its z-score, so the exact map
  between levels a and b is ``y_b = y_a sqrt(b lam + 1 - b) / sqrt(a lam + 1 - a)``.
  """

  def __init__(self, sched, mean, cov):
    self.ab = sched.alphas_cumprod
    self.mu64 = np.asarray(mean, np.float64).reshape(-1)
    self.cov64 = np.asarray(cov, np.float64)
    lam, u = np.linalg.eigh(self.cov64)
    self.lam64, self.u64 = lam, u
    self.mu = jnp.asarray(self.mu64, jnp.float32)
    self.lam = jnp.asarray(lam, jnp.float32)
    self.u = jnp.asarray(u, jnp.float32)

  def eps(self, x, t):
    a = self.ab[t][:, None]
    y = (x - jnp.sqrt(a) * self.mu) @ self.u
    return jnp.sqrt(1 - a) * ((y / (a * self.lam + 1 - a)) @ self.u.T)

  def flow(self, x, a_from: float, a_to: float) -> np.ndarray:
    """The exact probability-flow map of x [B, d] from level a_from to a_to (float64)."""
    x = np.asarray(x, np.float64)
    y = (x - np.sqrt(a_from) * self.mu64) @ self.u64
    y = y * np.sqrt(a_to * self.lam64 + 1 - a_to) / np.sqrt(a_from * self.lam64 + 1 - a_from)
    return np.sqrt(a_to) * self.mu64 + y @ self.u64.T

  def sample(self, n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, self.mu64.shape[0]))
    return self.mu64 + (z * np.sqrt(np.maximum(self.lam64, 0))) @ self.u64.T

  def conditional(self, keep: np.ndarray, x_known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the unknown coordinates (keep == 0) given the known ones."""
    k, u = keep.astype(bool), ~keep.astype(bool)
    s = self.cov64
    gain = s[np.ix_(u, k)] @ np.linalg.inv(s[np.ix_(k, k)])
    mean = self.mu64[u] + gain @ (x_known - self.mu64[k])
    return mean, s[np.ix_(u, u)] - gain @ s[np.ix_(k, u)]
