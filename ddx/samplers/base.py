"""What every sampler shares: the interface, the output split and x0 post-processing.

A sampler is an immutable pytree (a `flax.struct.dataclass`): its per-call coefficient tables
are array leaves (precomputed on the host in float64, stored float32) and its configuration
is static. It exposes

* ``timesteps``: int32 [N], the t given to the model at each of its N model calls;
* ``stochastic``: whether ``step`` consumes noise (False: the driver draws none);
* ``init(x_T) -> state`` and ``step(state, model_output, i, noise) -> state`` (pure; ``i`` is
  the model-call index, ``noise`` a standard normal array of x's shape or None);
* the current sample is ``state.x`` and the latest x0 prediction ``state.x0``.

Sample arrays are channels-last: a model output with twice the channels of x carries a
learned variance in its second half (used by DDPM ``learned_range``, dropped by the others,
like diffusers does for 3-channel models).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddx import diffusion


def split_output(output: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Return (prediction, variance channels or None); shapes are static, checked at trace time."""
  if output.shape == x.shape:
    return output.astype(jnp.float32), None
  if output.shape[:-1] == x.shape[:-1] and output.shape[-1] == 2 * x.shape[-1]:
    c = x.shape[-1]
    return output[..., :c].astype(jnp.float32), output[..., c:].astype(jnp.float32)
  raise ValueError(f"model_output: shape {output.shape} does not match the sample shape {x.shape} "
                   "(or twice its channels for a learned variance)")


def dynamic_threshold(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
  """diffusers ``_threshold_sample`` / Imagen dynamic thresholding, per batch element.

  ``s = clamp(quantile(|x0_b|, ratio), 1, max_value)``, ``x0_b = clamp(x0_b, -s, s) / s``.
  The quantile is linear interpolation at position ``ratio * (n - 1)`` of the sorted values
  (torch.quantile's default), done by an explicit sort for reference-exact results.
  """
  b = x0.shape[0]
  flat = jnp.abs(x0.reshape(b, -1).astype(jnp.float32))
  n = flat.shape[1]
  pos = ratio * (n - 1)
  lo = int(np.floor(pos))
  hi = min(lo + 1, n - 1)
  w = np.float32(pos - lo)
  srt = jnp.sort(flat, axis=1)
  below, above = srt[:, lo], srt[:, hi]
  # torch.lerp's two-sided formula
  q = jnp.where(w < 0.5, below + w * (above - below), above - (above - below) * (1 - w))
  s = jnp.clip(q, 1.0, max_value).reshape((b,) + (1,) * (x0.ndim - 1))
  return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


def process_x0(x0: jax.Array, *, clip_sample: bool, clip_range: float, thresholding: bool,
               threshold_ratio: float, threshold_max: float) -> jax.Array:
  """Thresholding replaces clipping when enabled (diffusers semantics)."""
  if thresholding:
    return dynamic_threshold(x0, threshold_ratio, threshold_max)
  if clip_sample:
    return jnp.clip(x0, -clip_range, clip_range)
  return x0


def check_prediction(prediction: str, allowed=diffusion.PREDICTIONS) -> str:
  if prediction not in allowed:
    raise ValueError(f"prediction: unknown or unsupported prediction type {prediction!r}; expected one of {allowed}")
  return prediction


def check_zero_snr(prediction: str, alphas: np.ndarray, what: str) -> None:
  """eps-prediction cannot be inverted where ab = 0 (zero terminal SNR)."""
  if prediction == "eps" and np.any(np.asarray(alphas) <= 0.0):
    raise ValueError(f"prediction: 'eps' is undefined where alphas_cumprod = 0 ({what} reaches the zero-SNR "
                     "timestep); use prediction='v' or 'x0', or a grid that avoids T-1")


# diffusers' DPMSolverMultistepScheduler replaces ab[T-1] = 0 of a zero-terminal-SNR schedule by
# 2^-24 so that log-SNR stays finite; ddx's ODE samplers (PLMS, DPM-Solver++) do the same.
ZERO_SNR_ALPHA = 2.0**-24


def clamp_zero_snr(alphas: np.ndarray) -> np.ndarray:
  return np.where(np.asarray(alphas) <= 0.0, ZERO_SNR_ALPHA, alphas)


def check_threshold_args(clip_range: float, threshold_ratio: float, threshold_max: float) -> None:
  if not clip_range > 0:
    raise ValueError(f"clip_range: must be > 0, got {clip_range}")
  if not 0.0 < threshold_ratio <= 1.0:
    raise ValueError(f"threshold_ratio: must be in (0, 1], got {threshold_ratio}")
  if not threshold_max >= 1.0:
    raise ValueError(f"threshold_max: must be >= 1, got {threshold_max}")


def f32(a) -> jax.Array:
  """Host float64 table -> float32 device array."""
  return jnp.asarray(np.asarray(a, dtype=np.float64).astype(np.float32))
