"""What every sampler shares: the `Sampler` contract, the output split and x0 post-processing.

A sampler is an immutable pytree (a `flax.struct.dataclass`): its per-call coefficient tables
are array leaves (precomputed on the host in float64, stored float32) and its configuration
is static. The contract the driver relies on is the `Sampler` protocol below. Sample arrays are
channels-last: a model output with twice the channels of x carries a learned variance in its
second half (used by DDPM ``learned_range``, dropped by the others, as diffusers does).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddx import diffusion


@runtime_checkable
class Sampler(Protocol):
  """What `ddx.sample` needs from a sampler.

  * ``timesteps``: int32 [N], the t given to the model at each of its N model calls;
  * ``stochastic``: whether ``step`` consumes noise (False: the driver draws none);
  * ``single_step``: whether a step needs nothing but the current sample (no multistep
    history), so that a run may start at any call or revisit calls (SDEdit, inpainting,
    RePaint); such a sampler also tells its ``noise_levels()``, what the editors need;
  * ``init(x_T) -> state`` and ``step(state, model_output, i, noise) -> state``, pure; ``i`` is
    the model-call index, ``noise`` a standard normal array of x's shape or None (one draw per
    model call, shared by ``model_input`` and ``step``);
  * ``model_input(state, i, noise) -> (x, t)``: what the model is called with (the sample and
    the scalar timestep: ``(state.x, timesteps[i])`` for the variance-preserving samplers, a
    rescaled sample for the σ-space ones);
  * the state has ``x`` (the current sample) and ``x0`` (the latest x0 prediction).
  """

  timesteps: jax.Array
  stochastic: bool
  single_step: bool

  def init(self, x_T: jax.Array) -> Any: ...

  def step(self, state: Any, model_output: jax.Array, i, noise: jax.Array | None) -> Any: ...

  def model_input(self, state: Any, i, noise: jax.Array | None) -> tuple[jax.Array, jax.Array]: ...


class State(NamedTuple):
  """The state of DDPM, DDIM and DPM-Solver++ (whose multistep history is the previous ``x0``)."""

  x: jax.Array  # the current sample
  x0: jax.Array  # the latest x0 prediction


class Common:
  """Methods shared by the sampler dataclasses (no fields of its own)."""

  single_step = False  # the multistep samplers' default; DDPM and DDIM override it

  def noise_levels(self) -> tuple[np.ndarray, np.ndarray]:
    """``(sqrt(a), sqrt(1 - a))`` float64 [N + 1]: the level of each model call, then the
    final level (after the last call). Single-step samplers only."""
    raise ValueError(f"sampler: expected a single-step sampler (DDPM or DDIM), got {type(self).__name__}")

  @property
  def num_calls(self) -> int:
    return int(self.timesteps.shape[0])

  def init(self, x_T: jax.Array) -> State:
    x = x_T.astype(jnp.float32)
    return State(x=x, x0=jnp.zeros_like(x))

  def model_input(self, state, i, noise):
    del noise
    return state.x, self.timesteps[i]


def split_output(output: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Return (prediction, variance channels or None); shapes are static, checked at trace time."""
  if output.shape == x.shape:
    return output.astype(jnp.float32), None
  if output.shape[:-1] == x.shape[:-1] and output.shape[-1] == 2 * x.shape[-1]:
    c = x.shape[-1]
    return output[..., :c].astype(jnp.float32), output[..., c:].astype(jnp.float32)
  raise ValueError(
    f"model_output: shape {output.shape} does not match the sample shape {x.shape} "
    "(or twice its channels for a learned variance)"
  )


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


@struct.dataclass
class X0Processing:
  """Per-step handling of the x0 prediction: static clip or dynamic thresholding.

  Thresholding replaces clipping when both are on (diffusers semantics). ``active`` says
  whether x0 can change, i.e. whether a sampler that combines x0 with eps must re-derive eps
  to stay consistent (docs/samplers.md §2.6).
  """

  clip_sample: bool = struct.field(pytree_node=False, default=False)
  clip_range: float = struct.field(pytree_node=False, default=1.0)
  thresholding: bool = struct.field(pytree_node=False, default=False)
  threshold_ratio: float = struct.field(pytree_node=False, default=0.995)
  threshold_max: float = struct.field(pytree_node=False, default=1.0)

  @property
  def active(self) -> bool:
    return self.clip_sample or self.thresholding

  def __call__(self, x0: jax.Array) -> jax.Array:
    if self.thresholding:
      return dynamic_threshold(x0, self.threshold_ratio, self.threshold_max)
    if self.clip_sample:
      return jnp.clip(x0, -self.clip_range, self.clip_range)
    return x0


def x0_processing(
  *,
  clip_sample: bool = False,
  clip_range: float = 1.0,
  thresholding: bool = False,
  threshold_ratio: float = 0.995,
  threshold_max: float = 1.0,
) -> X0Processing:
  """Validated `X0Processing` (ValueError naming the argument)."""
  check_threshold_args(clip_range, threshold_ratio, threshold_max)
  return X0Processing(
    clip_sample=bool(clip_sample),
    clip_range=float(clip_range),
    thresholding=bool(thresholding),
    threshold_ratio=float(threshold_ratio),
    threshold_max=float(threshold_max),
  )


def require_single_step(sampler, what: str) -> None:
  """ValueError naming ``what`` unless ``sampler`` is single-step (see `Sampler`)."""
  if not getattr(sampler, "single_step", False):
    raise ValueError(f"sampler: {what} needs a single-step sampler (DDPM or DDIM), got {type(sampler).__name__}")


def check_prediction(prediction: str, allowed=diffusion.PREDICTIONS) -> str:
  if prediction not in allowed:
    raise ValueError(f"prediction: unknown or unsupported prediction type {prediction!r}; expected one of {allowed}")
  return prediction


def check_zero_snr(prediction: str, alphas: np.ndarray, what: str) -> None:
  """eps-prediction cannot be inverted where ab = 0 (zero terminal SNR)."""
  if prediction == "eps" and np.any(np.asarray(alphas) <= 0.0):
    raise ValueError(
      f"prediction: 'eps' is undefined where alphas_cumprod = 0 ({what} reaches the zero-SNR "
      "timestep); use prediction='v' or 'x0', or a grid that avoids T-1"
    )


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
