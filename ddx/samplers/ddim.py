"""DDIM (Song et al. 2020); equations and conventions in docs/samplers.md §4.

One model call per grid point ``t -> t'`` (t' the next grid point, or the final alpha):

    x0    = from the model output (eps / x0 / v), then clip or dynamic threshold
    eps   = re-derived from the processed x0 (the default whenever x0 is clipped/thresholded),
            or the unprocessed model eps with use_clipped_model_output=False (diffusers' default)
    sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
    x'    = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z

Matches diffusers' DDIMScheduler for ``leading`` spacing (and ``trailing`` when S divides T),
CompVis' DDIMSampler with ``spacing="compvis_uniform"``/``"compvis_quad"`` and
``set_alpha_to_one=False``. Unlike diffusers (whose step always targets ``t - T//S``,
diffusers#11347) ddx steps to the next listed timestep for every spacing, and unlike the
removed Flax scheduler it really adds the eta noise.
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
class DDIM(base.Common):
  timesteps: jax.Array  # int32 [N]
  sqrt_alpha: jax.Array  # sqrt(ab[t])      float32 [N]
  sqrt_one_minus_alpha: jax.Array  # sqrt(1 - ab[t])
  sqrt_alpha_prev: jax.Array  # sqrt(a')       float32 [N]
  dir_coef: jax.Array  # sqrt(1 - a' - sigma^2)
  sigma: jax.Array
  prediction: str = struct.field(pytree_node=False, default="eps")
  x0_processing: base.X0Processing = struct.field(pytree_node=False, default=base.X0Processing())
  use_clipped_model_output: bool = struct.field(pytree_node=False, default=False)
  stochastic: bool = struct.field(pytree_node=False, default=False)

  single_step = True

  def noise_levels(self) -> tuple[np.ndarray, np.ndarray]:
    """``(sqrt(a), sqrt(1 - a))`` float64 [N + 1] per model call, then the final level a'.

    Read back from the float32 tables, which were cast from float64 (relative accuracy ~6e-8
    for both, including ``1 - a`` near t = 0, where ``1 - a`` computed from a float32 ``a``
    would lose four digits).
    """
    sa = np.asarray(self.sqrt_alpha, np.float64)
    s1a = np.asarray(self.sqrt_one_minus_alpha, np.float64)
    fa = float(np.asarray(self.sqrt_alpha_prev, np.float64)[-1])
    # 1 - a' = dir_coef^2 + sigma^2 (both from float64): exact to float32 even when a' ~ 1
    f1a = 0.0 if fa == 1.0 else float(np.hypot(np.float64(self.dir_coef[-1]), np.float64(self.sigma[-1])))
    return np.r_[sa, fa], np.r_[s1a, f1a]

  def step(self, state: base.State, model_output: jax.Array, i, noise: jax.Array | None) -> base.State:
    x = state.x
    out, _ = base.split_output(model_output, x)
    sa, s1a = self.sqrt_alpha[i], self.sqrt_one_minus_alpha[i]
    x0, eps = diffusion.to_x0_eps_sqrt(out, x, sa, s1a, self.prediction)
    x0 = self.x0_processing(x0)
    if self.use_clipped_model_output:
      eps = (x - sa * x0) / s1a
    x_prev = self.sqrt_alpha_prev[i] * x0 + self.dir_coef[i] * eps
    if self.stochastic:
      x_prev = x_prev + self.sigma[i] * noise
    return base.State(x=x_prev, x0=x0)


def make(
  sched: Schedule,
  num_steps: int,
  *,
  eta: float = 0.0,
  spacing: str = "leading",
  steps_offset: int = 0,
  timesteps=None,
  set_alpha_to_one: bool | None = None,
  prediction: str = "eps",
  clip_sample: bool = True,
  clip_range: float = 1.0,
  thresholding: bool = False,
  threshold_ratio: float = 0.995,
  threshold_max: float = 1.0,
  use_clipped_model_output: bool | None = None,
) -> DDIM:
  """Build a DDIM sampler.

  Args:
    num_steps: S, 1 <= S <= T (ignored if ``timesteps`` is given).
    eta: >= 0; 0 is deterministic, 1 equals DDPM fixed_small on the same grid.
    spacing: "leading" | "trailing" | "linspace" | "compvis_uniform" | "compvis_quad".
    timesteps: explicit strictly decreasing grid (overrides spacing).
    set_alpha_to_one: final alpha 1 (True, diffusers default) or ab[0] (False: CompVis and
      Stable Diffusion configs). Default: True, except False for the compvis spacings.
    prediction: "eps" | "x0" | "v".
    clip_sample, clip_range, thresholding, threshold_ratio, threshold_max: per-step x0
      processing (docs/samplers.md §2.6); defaults as diffusers' DDIMScheduler (clip to [-1, 1]).
    use_clipped_model_output: re-derive eps from the processed x0, so that each step combines one
      consistent (x0, eps) pair. Default (None): True whenever x0 is clipped or thresholded.
      False reproduces diffusers' default, which pairs the clipped x0 with the unclipped eps; that
      bias accumulates with the number of steps and collapses samples of a trained model at
      S = 500 (docs/samplers.md §7.1).
  """
  base.check_prediction(prediction)
  x0_proc = base.x0_processing(
    clip_sample=clip_sample,
    clip_range=clip_range,
    thresholding=thresholding,
    threshold_ratio=threshold_ratio,
    threshold_max=threshold_max,
  )
  if not (isinstance(eta, (int, float, np.floating)) and np.isfinite(eta) and eta >= 0):
    raise ValueError(f"eta: must be a finite number >= 0, got {eta!r}")
  T = sched.num_timesteps
  if timesteps is not None:
    ts = grids.validate(timesteps, T)
  else:
    ts = grids.make(spacing, T, num_steps, steps_offset)
  if set_alpha_to_one is None:
    set_alpha_to_one = not (timesteps is None and spacing.startswith("compvis"))
  ab = sched.f64.alphas_cumprod
  a = ab[ts]
  final = 1.0 if set_alpha_to_one else ab[0]
  a_prev = np.concatenate([ab[ts[1:]], [final]])
  base.check_zero_snr(prediction, a, "the DDIM grid")
  var = (1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)
  sigma = float(eta) * np.sqrt(var)
  # 1 - a' - sigma^2 >= 0 analytically; clamp float64 round-off so sqrt never sees < 0.
  dir_coef = np.sqrt(np.maximum(1.0 - a_prev - sigma**2, 0.0))
  return DDIM(
    timesteps=jnp.asarray(ts, jnp.int32),
    sqrt_alpha=base.f32(np.sqrt(a)),
    sqrt_one_minus_alpha=base.f32(np.sqrt(1.0 - a)),
    sqrt_alpha_prev=base.f32(np.sqrt(a_prev)),
    dir_coef=base.f32(dir_coef),
    sigma=base.f32(sigma),
    prediction=prediction,
    x0_processing=x0_proc,
    use_clipped_model_output=x0_proc.active if use_clipped_model_output is None else bool(use_clipped_model_output),
    stochastic=bool(eta > 0),
  )
