"""Editing with a trained model: DDIM inversion, interpolation, SDEdit, inpainting; docs/samplers.md §8.

Every tool is a run of the one scan driver (`ddx.sample`): inversion is a sampler of its own
(`DDIMInverse`, the DDIM step run upwards on the forward sampler's grid), SDEdit starts the
driver at a later model call, inpainting passes a hook that pastes the known pixels after
each step, RePaint passes a precomputed plan of model calls and forward "undo" entries.

Conventions:
* Images are float32 [B, H, W, C] in [-1, 1] (any [B, ...] works); masks are 1 = keep
  (known pixel), 0 = fill, of the image's shape without the batch axis, or with it.
* Keys are arguments; sub-keys are ``fold_in(key, j)`` with j documented per function.
* The noise level after the last model call is the sampler's final alpha (1 for DDPM and
  for DDIM with ``set_alpha_to_one``, else ``ab[0]``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ddx import diffusion
from ddx.samplers import base
from ddx.samplers.ddim import DDIM
from ddx.sampling import Plan, sample

INPAINT_METHODS = ("replace", "repaint")

__all__ = [
  "INPAINT_METHODS",
  "DDIMInverse",
  "inverse_sampler",
  "invert",
  "reconstruct",
  "slerp",
  "interpolation_grid",
  "sdedit",
  "sdedit_start",
  "inpaint",
  "repaint",
  "repaint_plan",
  "known_hook",
  "levels",
  "check_mask",
]


# --- the sampler's noise levels, float64 ---------------------------------------------------


def levels(sampler, what: str = "editing") -> tuple[np.ndarray, np.ndarray]:
  """``sampler.noise_levels()`` of a single-step sampler (ValueError naming ``what`` otherwise)."""
  base.require_single_step(sampler, what)
  return sampler.noise_levels()


def _gap(sa, s1a, sb, s1b) -> np.ndarray:
  """``b - a`` for levels a < b given both square roots, from whichever form cancels less:
  ``(sb - sa)(sb + sa)`` (good where a, b are small) or ``s1a^2 - s1b^2`` (good near 1)."""
  d1 = (sb - sa) * (sb + sa)
  d2 = (s1a - s1b) * (s1a + s1b)
  return np.where(sa**2 + sb**2 < s1a**2 + s1b**2, d1, d2)


# --- inversion -----------------------------------------------------------------------------


@struct.dataclass
class DDIMInverse(base.Common):
  """The deterministic DDIM step run upwards (x0 -> x_T) on a forward grid reversed.

  Call k goes from the current level ``a`` to the next higher grid level ``a_n`` with the
  model evaluated at the *target* timestep on the current sample (diffusers'
  DDIMInverseScheduler, latent-diffusion's ``DDIMSampler.encode``); docs/samplers.md §8.1:

      eps = model(x, t_n) (x0 / v outputs converted at a_n)
      x'  = sqrt(a_n) (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a_n) eps

  Never clips x0: clipping is not invertible.
  """

  timesteps: jax.Array  # int32 [N] ascending: the target timestep of each call
  sqrt_alpha: jax.Array  # sqrt(a_n) at the target (output conversion)
  sqrt_one_minus_alpha: jax.Array
  coef_x: jax.Array  # sqrt(a_n / a)
  coef_e: jax.Array  # sqrt(1 - a_n) - sqrt(a_n) sqrt(1 - a) / sqrt(a)
  prediction: str = struct.field(pytree_node=False, default="eps")
  stochastic: bool = struct.field(pytree_node=False, default=False)

  def step(self, state: base.State, model_output: jax.Array, i, noise=None) -> base.State:
    del noise
    out, _ = base.split_output(model_output, state.x)
    x0, eps = diffusion.to_x0_eps_sqrt(out, state.x, self.sqrt_alpha[i], self.sqrt_one_minus_alpha[i], self.prediction)
    return base.State(x=self.coef_x[i] * state.x + self.coef_e[i] * eps, x0=x0)


def _check_deterministic_ddim(sampler, what: str) -> None:
  if not isinstance(sampler, DDIM) or sampler.stochastic:
    got = type(sampler).__name__ + (" with eta > 0" if isinstance(sampler, DDIM) else "")
    raise ValueError(f"sampler: {what} needs a deterministic DDIM sampler (eta=0), got {got}")


def inverse_sampler(sampler: DDIM) -> DDIMInverse:
  """The `DDIMInverse` on ``sampler``'s grid, from its final level up to its first timestep."""
  _check_deterministic_ddim(sampler, "inversion")
  sa, s1a = levels(sampler)
  # forward levels: call 0 (highest noise) .. call N-1, final. Inverse call k: level index
  # N - k (current) -> N - 1 - k (target).
  cur_sa, cur_s1a = sa[::-1][:-1], s1a[::-1][:-1]
  tgt_sa, tgt_s1a = sa[::-1][1:], s1a[::-1][1:]
  coef_x = tgt_sa / cur_sa
  coef_e = tgt_s1a - tgt_sa * cur_s1a / cur_sa
  return DDIMInverse(
    timesteps=jnp.asarray(np.asarray(sampler.timesteps)[::-1].copy(), jnp.int32),
    sqrt_alpha=base.f32(tgt_sa),
    sqrt_one_minus_alpha=base.f32(tgt_s1a),
    coef_x=base.f32(coef_x),
    coef_e=base.f32(coef_e),
    prediction=sampler.prediction,
  )


def _check_images(name: str, x) -> jax.Array:
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  if x.ndim < 2 or x.shape[0] < 1:
    raise ValueError(f"{name}: expected a batch [B, ...] with B >= 1, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
  return x.astype(jnp.float32)


def invert(model_fn: Callable, sampler: DDIM, x0, return_all: bool = False, *, progress=None):
  """DDIM inversion: the latent x_T [B, ...] that ``sampler`` maps (approximately) back to x0.

  Args:
    model_fn: ``(x, t) -> output`` as for `ddx.sample`.
    sampler: a deterministic DDIM sampler; its grid and final alpha define the levels, its
      clipping settings are ignored (inversion never clips).
    x0: images [B, ...].
    return_all: also return the latents after every call, [N, B, ...], from the lowest
      noise level (``sampler.timesteps[-1]``) to the highest (``timesteps[0]``).
  """
  x0 = _check_images("x0", x0)
  inv = inverse_sampler(sampler)
  if return_all:
    return sample(model_fn, inv, x0, return_x_at=range(inv.num_calls), progress=progress)
  return sample(model_fn, inv, x0, progress=progress)


def reconstruct(model_fn: Callable, sampler: DDIM, x0, *, progress=None) -> jax.Array:
  """``sample(invert(x0))`` on the same grid; the sampler must not clip or threshold x0."""
  if isinstance(sampler, DDIM) and sampler.x0_processing.active:
    raise ValueError(
      "sampler: reconstruction needs clip_sample=False and thresholding=False (clipping x0 is not invertible)"
    )
  x_T = invert(model_fn, sampler, x0, progress=progress)
  return sample(model_fn, sampler, x_T, progress=progress)


# --- interpolation -------------------------------------------------------------------------


def slerp(x_a, x_b, alpha) -> jax.Array:
  """Spherical interpolation (DDIM paper App. D.5) per batch element.

  ``theta = arccos(<a, b> / (|a| |b|))``,
  ``x = sin((1 - alpha) theta) / sin(theta) a + sin(alpha theta) / sin(theta) b``;
  x_a, x_b [B, ...]; alpha a scalar or [B]. Falls back to linear interpolation where
  theta < 1e-4 (parallel latents).
  """
  x_a, x_b = jnp.asarray(x_a, jnp.float32), jnp.asarray(x_b, jnp.float32)
  if x_a.shape != x_b.shape or x_a.ndim < 1:
    raise ValueError(f"x_b: shape {x_b.shape} does not match x_a {x_a.shape}")
  return _slerp(x_a, x_b, jnp.asarray(alpha, jnp.float32))


@jax.jit
def _slerp(x_a, x_b, alpha):
  b = x_a.shape[0]
  fa, fb = x_a.reshape(b, -1), x_b.reshape(b, -1)
  cos = jnp.sum(fa * fb, -1) / (jnp.linalg.norm(fa, axis=-1) * jnp.linalg.norm(fb, axis=-1))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  al = jnp.broadcast_to(alpha, (b,))
  small = theta < 1e-4
  st = jnp.where(small, 1.0, jnp.sin(theta))
  wa = jnp.where(small, 1.0 - al, jnp.sin((1.0 - al) * theta) / st)
  wb = jnp.where(small, al, jnp.sin(al * theta) / st)
  shape = (b,) + (1,) * (x_a.ndim - 1)
  return wa.reshape(shape) * x_a + wb.reshape(shape) * x_b


def interpolation_grid(x_a, x_b, num: int) -> jax.Array:
  """``num`` slerps from x_a to x_b (alpha = 0, 1/(num-1), ..., 1) for each of B pairs:
  x_a, x_b [B, ...] -> [B * num, ...], row-major (pair b's row is entries b*num .. b*num+num-1)."""
  if not isinstance(num, (int, np.integer)) or num < 2:
    raise ValueError(f"num: must be an integer >= 2, got {num!r}")
  x_a, x_b = jnp.asarray(x_a, jnp.float32), jnp.asarray(x_b, jnp.float32)
  alphas = jnp.linspace(0.0, 1.0, num, dtype=jnp.float32)
  rows = jax.vmap(lambda al: slerp(x_a, x_b, al))(alphas)  # [num, B, ...]
  return jnp.swapaxes(rows, 0, 1).reshape((-1,) + x_a.shape[1:])


# --- SDEdit / img2img ----------------------------------------------------------------------


def sdedit_start(num_calls: int, strength: float) -> int:
  """diffusers img2img ``get_timesteps``: the first model call for ``strength`` in (0, 1].

  ``init = min(int(S * strength), S)``, start ``S - init``; the image is noised to the level
  of that same call (CompVis' img2img noises to index t_enc and starts denoising one grid
  point lower). ``start == S`` means no step at all (strength < 1/S): the input is returned.
  """
  if (
    isinstance(strength, bool)
    or not isinstance(strength, (int, float, np.floating))
    or not (math.isfinite(strength) and 0.0 < strength <= 1.0)
  ):
    raise ValueError(f"strength: must be in (0, 1], got {strength!r}")
  init = min(int(num_calls * strength), num_calls)
  return max(num_calls - init, 0)


def sdedit(model_fn: Callable, sampler, x0, strength: float, key: jax.Array, *, progress=None) -> jax.Array:
  """SDEdit / img2img: noise x0 [B, ...] to the level of call ``sdedit_start(N, strength)``
  with ``normal(fold_in(key, 0))`` and run the remaining calls (noise ``fold_in(key, 1)``).

  strength 1 is plain sampling from a q_sample of x0 at the first grid level; strength < 1/N
  returns x0 unchanged. Needs a DDPM or DDIM sampler.
  """
  sa, s1a = levels(sampler)
  start = sdedit_start(len(sa) - 1, strength)
  x0 = _check_images("x0", x0)
  if start == len(sa) - 1:
    return x0
  noise = jax.random.normal(jax.random.fold_in(key, 0), x0.shape, jnp.float32)
  x_start = jnp.float32(sa[start]) * x0 + jnp.float32(s1a[start]) * noise
  return sample(model_fn, sampler, x_start, jax.random.fold_in(key, 1), start=start, progress=progress)


# --- inpainting ----------------------------------------------------------------------------


def check_mask(mask, x0) -> jax.Array:
  """A binary float32 mask (1 = keep) of x0's shape, or of x0.shape[1:] (broadcast)."""
  m = np.asarray(mask)
  if m.shape not in (tuple(x0.shape), tuple(x0.shape[1:])):
    raise ValueError(f"mask: expected shape {tuple(x0.shape[1:])} or {tuple(x0.shape)}, got {m.shape}")
  if not np.all((m == 0) | (m == 1)):
    raise ValueError(f"mask: must be binary (1 = keep, 0 = fill), got values {np.unique(m)[:6].tolist()}")
  return jnp.asarray(m, jnp.float32)


def _known(x, i, e, x0, mask, sa, s1a, key):
  """Paste the known pixels at the level after call i: ``sqrt(a') x0 + sqrt(1-a') z``,
  z = normal(fold_in(key, e))."""
  z = jax.random.normal(jax.random.fold_in(key, e), x.shape, jnp.float32)
  known = sa[i + 1] * x0 + s1a[i + 1] * z
  return mask * known + (1.0 - mask) * x


def known_hook(sampler, x0, mask, key) -> jax.tree_util.Partial:
  """The driver hook ``(x, i, e) -> x`` that replaces the known region (mask 1) after call i
  by a forward-noised copy of x0 at the new level, with noise ``normal(fold_in(key, e))``."""
  sa, s1a = levels(sampler)
  return jax.tree_util.Partial(_known, x0=x0, mask=mask, sa=base.f32(sa), s1a=base.f32(s1a), key=key)


def _start_inpaint(sampler, x0, mask, key):
  """x_T: noise ``fold_in(key, 0)`` with the known region at the first level (noise ``fold_in(key, 3)``)."""
  x0 = _check_images("x0", x0)
  mask = check_mask(mask, x0)
  sa, s1a = levels(sampler, "inpainting")
  x_T = jax.random.normal(jax.random.fold_in(key, 0), x0.shape, jnp.float32)
  z = jax.random.normal(jax.random.fold_in(key, 3), x0.shape, jnp.float32)
  x_T = mask * (jnp.float32(sa[0]) * x0 + jnp.float32(s1a[0]) * z) + (1.0 - mask) * x_T
  return x0, mask, x_T, known_hook(sampler, x0, mask, jax.random.fold_in(key, 2))


def inpaint(model_fn: Callable, sampler, x0, mask, key: jax.Array, *, progress=None) -> jax.Array:
  """Inpainting by replacement: before each model call the known region (mask 1) holds a
  forward-noised copy of x0 at the current level; the rest is sampled.

  x_T from ``fold_in(key, 0)``, the sampler's noise from ``fold_in(key, 1)``, the known
  region's noise from ``fold_in(key, 2)`` (per entry) and ``fold_in(key, 3)`` (at x_T).
  Needs a DDPM or DDIM sampler. Returns [B, ...]; with a final alpha of 1 the known pixels
  equal x0 exactly.
  """
  x0, mask, x_T, hook = _start_inpaint(sampler, x0, mask, key)
  return sample(model_fn, sampler, x_T, jax.random.fold_in(key, 1), hook=hook, progress=progress)


def repaint_plan(sampler, jump_length: int = 10, jump_n_sample: int = 10) -> Plan:
  """The RePaint schedule (Lugmayr et al. 2022, Alg. 1 with time jumps) as a driver `Plan`.

  Walking down the grid, at every ``jump_length``-th grid point g < N - jump_length (counted
  from the least noisy, g = 0) the run goes back up ``jump_length`` levels, ``jump_n_sample - 1``
  times, each up move the forward "undo" of one model call:
  ``x <- sqrt(a / a') x + sqrt(1 - a / a') z`` from the level a' after call i to its level a.
  """
  for name, v in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
  sa, s1a = levels(sampler)
  n = len(sa) - 1
  left = {g: jump_n_sample - 1 for g in range(0, n - jump_length, jump_length)}
  calls, up = [], []
  g = n
  while g >= 1:
    g -= 1
    calls.append(n - 1 - g)
    up.append(False)
    if left.get(g, 0) > 0:
      left[g] -= 1
      for k in range(jump_length):
        calls.append(n - 1 - (g + k))  # undo the call at grid point g + k
        up.append(True)
      g += jump_length
  calls = np.asarray(calls, np.int64)
  up = np.asarray(up, bool)
  # undo call i: from a' (level i + 1) to a (level i): ratio a / a' and 1 - a / a' = (a' - a) / a'
  cx = sa[calls] / sa[calls + 1]
  cz = np.sqrt(_gap(sa[calls], s1a[calls], sa[calls + 1], s1a[calls + 1])) / sa[calls + 1]
  cx, cz = np.where(up, cx, 0.0), np.where(up, cz, 0.0)
  return Plan(calls.astype(np.int32), up, cx.astype(np.float32), cz.astype(np.float32))


def repaint(
  model_fn: Callable,
  sampler,
  x0,
  mask,
  key: jax.Array,
  jump_length: int = 10,
  jump_n_sample: int = 10,
  *,
  progress=None,
) -> jax.Array:
  """RePaint: `inpaint` with resampling (`repaint_plan`), run as one scan.

  Keys as in `inpaint`; the plan's entries (model calls and undo steps) draw their noise from
  ``fold_in(fold_in(key, 1), e)``. ``jump_n_sample=1`` is plain replacement.
  """
  x0, mask, x_T, hook = _start_inpaint(sampler, x0, mask, key)
  plan = repaint_plan(sampler, jump_length, jump_n_sample)
  return sample(model_fn, sampler, x_T, jax.random.fold_in(key, 1), hook=hook, plan=plan, progress=progress)
