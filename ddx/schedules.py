"""Beta schedules and the `Schedule` pytree.

All schedule math runs on the host in float64 (numpy). A `Schedule` carries

* float32 device arrays (its pytree leaves) for use inside jitted code, and
* the exact float64 arrays on the host (`sched.f64`), from which samplers build their
  per-step coefficient tables before casting them to float32.

Index convention (docs/samplers.md §1): arrays are indexed by the code index
``n in {0, ..., T-1}``; ``x_n`` has been noised ``n + 1`` times, clean data is index -1 and
``alphas_cumprod[-1] := 1`` conceptually (never stored: JAX indexing clamps, so callers
select the final alpha explicitly).

Names follow diffusers' ``beta_schedule``: ``"linear"`` (beta linear in n),
``"scaled_linear"`` (sqrt(beta) linear in n, Stable Diffusion's; CompVis calls it
``"linear"``), ``"cosine"`` (Nichol & Dhariwal, diffusers ``"squaredcos_cap_v2"``),
``"sigmoid"`` (GeoDiff).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "Schedule",
  "make",
  "SCHEDULE_NAMES",
  "canonical_name",
  "linear_betas",
  "scaled_linear_betas",
  "cosine_betas",
  "sigmoid_betas",
  "rescale_zero_terminal_snr",
]

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
_ALIASES = {"squaredcos_cap_v2": "cosine"}


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """``beta[n] = beta_start + n (beta_end - beta_start) / (T - 1)``, float64 [T]."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """sqrt(beta) linear in n (Stable Diffusion), float64 [T]."""
  return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal: ``beta[n] = min(1 - f((n+1)/T) / f(n/T), max_beta)``, float64 [T]."""
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
  return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """``beta[n] = sigmoid(-6 + 12 n / (T-1)) (beta_end - beta_start) + beta_start``."""
  z = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
  return 1.0 / (1.0 + np.exp(-z)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescale betas so that ``alphas_cumprod[T-1] == 0`` exactly (arXiv 2305.08891, Alg. 1).

  The first value of sqrt(alphas_cumprod) is kept, the last is moved to 0, the rest shifted
  and scaled linearly. Only v- (or x0-) prediction is usable afterwards: eps-prediction at
  the last timestep divides by sqrt(alphas_cumprod) = 0.
  """
  r = np.sqrt(np.cumprod(1.0 - betas))
  r0, rT = r[0], r[-1]
  r = (r - rT) * r0 / (r0 - rT)
  ab = r**2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return 1.0 - alphas


class _HostArrays:
  """Float64 host copies of a schedule; hashable by content so a Schedule can be static aux data."""

  def __init__(self, betas: np.ndarray):
    betas = np.asarray(betas, dtype=np.float64)
    betas.setflags(write=False)
    self.betas = betas
    self.alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(self.alphas)
    self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
    for a in (self.alphas, self.alphas_cumprod, self.alphas_cumprod_prev):
      a.setflags(write=False)
    self._digest = hashlib.sha1(betas.tobytes()).hexdigest()

  def __hash__(self):
    return hash(self._digest)

  def __eq__(self, other):
    return isinstance(other, _HostArrays) and self._digest == other._digest


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A discrete variance-preserving noise schedule with T steps.

  Leaves (float32, shape [T], code index n): ``betas``, ``alphas_cumprod``,
  ``alphas_cumprod_prev`` (``ab[n-1]``, 1 at n = 0), ``sqrt_alphas_cumprod``,
  ``sqrt_one_minus_alphas_cumprod``. The float64 host values are ``f64.betas``,
  ``f64.alphas_cumprod``, ``f64.alphas_cumprod_prev`` (aux data, not traced).
  """

  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  f64: _HostArrays

  @property
  def num_timesteps(self) -> int:
    return int(self.f64.betas.shape[0])

  @property
  def zero_terminal_snr(self) -> bool:
    return bool(self.f64.alphas_cumprod[-1] == 0.0)

  def tree_flatten(self):
    leaves = (
      self.betas,
      self.alphas_cumprod,
      self.alphas_cumprod_prev,
      self.sqrt_alphas_cumprod,
      self.sqrt_one_minus_alphas_cumprod,
    )
    return leaves, self.f64

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    return cls(*leaves, f64=aux)

  @classmethod
  def from_betas(cls, betas: Sequence[float] | np.ndarray) -> "Schedule":
    """Build a schedule from explicit betas (validated: finite, 0 <= beta <= 1, beta[0] < 1)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
      raise ValueError(f"betas: expected a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or np.any(betas < 0) or np.any(betas > 1):
      raise ValueError("betas: every beta must be finite and in [0, 1]")
    if betas[0] >= 1.0:
      raise ValueError("betas: beta[0] must be < 1 (alphas_cumprod would be 0 everywhere)")
    host = _HostArrays(betas)
    ab = host.alphas_cumprod
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
    return cls(
      betas=f32(host.betas),
      alphas_cumprod=f32(ab),
      alphas_cumprod_prev=f32(host.alphas_cumprod_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ab)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
      f64=host,
    )


def canonical_name(name: str, *, extra: str = "") -> str:
  """A schedule name in ddx's vocabulary (diffusers' aliases accepted); ValueError otherwise."""
  canon = _ALIASES.get(name, name)
  if canon not in SCHEDULE_NAMES:
    raise ValueError(f"name: unknown beta schedule {name!r}; expected one of {SCHEDULE_NAMES}{extra}")
  return canon


def make(
  name: str | None = "linear",
  num_timesteps: int = 1000,
  *,
  beta_start: float | None = None,
  beta_end: float | None = None,
  betas: Sequence[float] | np.ndarray | None = None,
  rescale_zero_snr: bool = False,
) -> Schedule:
  """Build a schedule by name, or from explicit ``betas`` (then ``name`` must be None).

  Args:
    name: "linear" | "scaled_linear" | "cosine" (alias "squaredcos_cap_v2") | "sigmoid".
    num_timesteps: T >= 1 (ignored when ``betas`` is given: T = len(betas)).
    beta_start, beta_end: endpoints for linear / scaled_linear / sigmoid. Defaults 1e-4 and
      0.02 (DDPM); Stable Diffusion uses scaled_linear with 0.00085 and 0.012.
    betas: explicit betas, float [T].
    rescale_zero_snr: apply `rescale_zero_terminal_snr` (ab[T-1] = 0; v-prediction only).
  """
  if betas is not None:
    if name not in (None, "custom"):
      raise ValueError(f"name: give either a schedule name or explicit betas, not both (name={name!r})")
    b = np.asarray(betas, dtype=np.float64)
  else:
    name = canonical_name(name, extra=" or betas=")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
      raise ValueError(f"num_timesteps: must be an integer >= 1, got {num_timesteps!r}")
    if name == "cosine":
      if beta_start is not None or beta_end is not None:
        raise ValueError("beta_start/beta_end: not used by the cosine schedule")
      b = cosine_betas(int(num_timesteps))
    else:
      bs = 1e-4 if beta_start is None else float(beta_start)
      be = 0.02 if beta_end is None else float(beta_end)
      if not (0.0 <= bs < 1.0):
        raise ValueError(f"beta_start: must be in [0, 1), got {bs}")
      if not (0.0 <= be < 1.0):
        raise ValueError(f"beta_end: must be in [0, 1), got {be}")
      if num_timesteps == 1 and name != "sigmoid":
        b = np.array([bs])
      else:
        fn = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "sigmoid": sigmoid_betas}[name]
        b = fn(int(num_timesteps), bs, be)
  if rescale_zero_snr:
    if b.shape[0] < 2:
      raise ValueError("rescale_zero_snr: needs at least 2 timesteps")
    b = rescale_zero_terminal_snr(np.asarray(b, np.float64))
  return Schedule.from_betas(b)
