"""DDPM ancestral sampling on a (possibly respaced) grid; docs/samplers.md §3.

For a step ``t -> t'`` (t' the next grid point, -1 after the last: ``a' = 1``) with
``a = ab[t]``, ``alpha' = a / a'``, ``beta' = 1 - alpha'``:

    mean = sqrt(a') beta' / (1 - a) * x0 + sqrt(alpha') (1 - a') / (1 - a) * x
    x'   = mean + [t > 0] * std * z

with ``std`` by ``variance``: ``fixed_small`` sqrt(max(beta_tilde', 1e-20)) where
``beta_tilde' = (1 - a') / (1 - a) beta'``; ``fixed_large`` sqrt(beta');
``learned_range`` exp(0.5 (f log beta' + (1 - f) log max(beta_tilde', 1e-20))),
``f = (v + 1) / 2`` from the model's extra channels. With S = T this is the original DDPM
chain; with S < T it is improved-diffusion's respacing. Matches diffusers' DDPMScheduler
(PR #9384 semantics: the target is the next listed timestep), including its noise at the
last step when that timestep is > 0 (``steps_offset=1`` or ``trailing``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddx import diffusion
from ddx.samplers import base, grids
from ddx.schedules import Schedule


@struct.dataclass
class DDPM(base.Common):
  timesteps: jax.Array  # int32 [N]
  sqrt_alpha: jax.Array  # sqrt(ab[t])
  sqrt_one_minus_alpha: jax.Array
  coef_x0: jax.Array  # sqrt(a') beta' / (1 - a)
  coef_x: jax.Array  # sqrt(alpha') (1 - a') / (1 - a)
  std: jax.Array  # fixed std (fixed_small / fixed_large), 0 where t == 0
  log_beta: jax.Array  # learned_range: log beta'
  log_var_min: jax.Array  # learned_range: log max(beta_tilde', 1e-20)
  noise_mask: jax.Array  # 1.0 where t > 0
  prediction: str = struct.field(pytree_node=False, default="eps")
  variance: str = struct.field(pytree_node=False, default="fixed_small")
  x0_processing: base.X0Processing = struct.field(pytree_node=False, default=base.X0Processing())
  stochastic: bool = struct.field(pytree_node=False, default=True)

  single_step = True

  def noise_levels(self) -> tuple[np.ndarray, np.ndarray]:
    """``(sqrt(a), sqrt(1 - a))`` float64 [N + 1] per model call, then the final level (DDPM
    always ends at a' = 1); read back from the float32 tables cast from float64."""
    sa = np.asarray(self.sqrt_alpha, np.float64)
    s1a = np.asarray(self.sqrt_one_minus_alpha, np.float64)
    return np.r_[sa, 1.0], np.r_[s1a, 0.0]

  def step(self, state: base.State, model_output: jax.Array, i, noise: jax.Array) -> base.State:
    x = state.x
    out, var_out = base.split_output(model_output, x)
    if self.variance == "learned_range" and var_out is None:
      raise ValueError(
        "model_output: variance='learned_range' needs twice the sample's channels "
        f"(got shape {model_output.shape} for sample {x.shape})"
      )
    x0, _ = diffusion.to_x0_eps_sqrt(out, x, self.sqrt_alpha[i], self.sqrt_one_minus_alpha[i], self.prediction)
    # The posterior mean below is built from x0 alone, so clipping keeps the update consistent.
    x0 = self.x0_processing(x0)
    mean = self.coef_x0[i] * x0 + self.coef_x[i] * x
    if self.variance == "learned_range":
      frac = (var_out + 1.0) / 2.0
      std = jnp.exp(0.5 * (frac * self.log_beta[i] + (1.0 - frac) * self.log_var_min[i])) * self.noise_mask[i]
    else:
      std = self.std[i]
    return base.State(x=mean + std * noise, x0=x0)


def make(
  sched: Schedule,
  num_steps: int | None = None,
  *,
  variance: str = "fixed_small",
  spacing: str = "leading",
  steps_offset: int = 0,
  timesteps=None,
  prediction: str = "eps",
  clip_sample: bool = True,
  clip_range: float = 1.0,
  thresholding: bool = False,
  threshold_ratio: float = 0.995,
  threshold_max: float = 1.0,
) -> DDPM:
  """Build a DDPM ancestral sampler. ``num_steps=None`` means the full chain (S = T).

  Defaults follow diffusers' DDPMScheduler (fixed_small, clip_sample=True, leading spacing).
  The original DDPM CIFAR-10 sampler is ``variance="fixed_large"``, S = T.
  """
  base.check_prediction(prediction)
  x0_proc = base.x0_processing(
    clip_sample=clip_sample,
    clip_range=clip_range,
    thresholding=thresholding,
    threshold_ratio=threshold_ratio,
    threshold_max=threshold_max,
  )
  if variance not in diffusion.VARIANCES:
    raise ValueError(f"variance: unknown variance type {variance!r}; expected one of {diffusion.VARIANCES}")
  T = sched.num_timesteps
  if timesteps is not None:
    ts = grids.validate(timesteps, T)
  else:
    ts = grids.make(spacing, T, T if num_steps is None else num_steps, steps_offset)
  ab = sched.f64.alphas_cumprod
  a = ab[ts]
  a_prev = np.concatenate([ab[ts[1:]], [1.0]])
  base.check_zero_snr(prediction, a, "the DDPM grid")
  alpha_t = a / a_prev
  beta_t = 1.0 - alpha_t
  var_small = np.maximum((1.0 - a_prev) / (1.0 - a) * beta_t, 1e-20)
  mask = (ts > 0).astype(np.float64)
  std = np.sqrt(var_small if variance == "fixed_small" else beta_t) * mask
  return DDPM(
    timesteps=jnp.asarray(ts, jnp.int32),
    sqrt_alpha=base.f32(np.sqrt(a)),
    sqrt_one_minus_alpha=base.f32(np.sqrt(1.0 - a)),
    coef_x0=base.f32(np.sqrt(a_prev) * beta_t / (1.0 - a)),
    coef_x=base.f32(np.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a)),
    std=base.f32(std),
    log_beta=base.f32(np.log(np.maximum(beta_t, 1e-300))),
    log_var_min=base.f32(np.log(var_small)),
    noise_mask=base.f32(mask),
    prediction=prediction,
    variance=variance,
    x0_processing=x0_proc,
  )
