"""The sampling driver: one jitted ``lax.scan`` over a sampler's model calls.

    x0 = ddx.sample(model_fn, sampler, x_T, key)

* ``model_fn(x, t) -> output``: x float32 [B, ...], t int32 [B] (the sampler's timestep for
  this call, broadcast over the batch). Its output is eps / x0 / v as the sampler was built
  for, of x's shape (or twice its channels for a learned variance, channels-last).
  ``model_fn`` may be a plain function, a ``jax.tree_util.Partial`` or an ``nnx.Module``:
  its array leaves (e.g. parameters) are passed to the compiled program as arguments, not
  baked in as constants; everything else is static.
* The noise of call i is ``normal(fold_in(key, i), x.shape)``; deterministic samplers draw
  none and accept ``key=None``. With ``jax_threefry_partitionable`` (the default) the draws
  do not depend on how x_T is sharded.
* Compiled once per (shapes, sampler structure, model structure): the loop body is traced
  once, so compile time does not grow with the number of steps.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddx.samplers.base import Sampler


def _partition(tree):
  """Split a pytree into (array leaves, static rest) so jit traces only the arrays."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_arr = tuple(isinstance(l, (jax.Array, np.ndarray)) for l in leaves)
  arrays = [l for l, a in zip(leaves, is_arr) if a]
  statics = tuple(None if a else l for l, a in zip(leaves, is_arr))
  return arrays, _Static(treedef, is_arr, statics)


class _Static:
  """Hashable static part of a partitioned pytree (leaves compared by identity/equality)."""

  def __init__(self, treedef, is_arr, statics):
    self.treedef, self.is_arr, self.statics = treedef, is_arr, statics

  def _key(self):
    return (self.treedef, self.is_arr, tuple(id(s) if not _hashable(s) else s for s in self.statics))

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key() == other._key()

  def combine(self, arrays):
    it = iter(arrays)
    leaves = [next(it) if a else s for a, s in zip(self.is_arr, self.statics)]
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _hashable(x) -> bool:
  try:
    hash(x)
    return True
  except TypeError:
    return False


def _x0_slots(num_calls: int, indices: Sequence[int]) -> np.ndarray:
  slots = np.full((num_calls,), len(indices), np.int32)  # len(indices) = a scratch slot
  for j, i in enumerate(indices):
    slots[i] = j
  return slots


@functools.partial(jax.jit, static_argnames=("model_static", "sampler_static", "num_x0"))
def _run(model_arrays, sampler_arrays, x_T, key, x0_slots, *, model_static, sampler_static, num_x0):
  model_fn = model_static.combine(model_arrays)
  sampler = sampler_static.combine(sampler_arrays)
  batch = x_T.shape[0]

  def body(carry, i):
    state, buf = carry
    t = jnp.broadcast_to(sampler.timesteps[i], (batch,))
    out = model_fn(state.x, t)
    noise = jax.random.normal(jax.random.fold_in(key, i), state.x.shape, jnp.float32) if sampler.stochastic else None
    state = sampler.step(state, out, i, noise)
    if num_x0:
      buf = jax.lax.dynamic_update_index_in_dim(buf, state.x0, x0_slots[i], 0)
    return (state, buf), None

  state = sampler.init(x_T)
  buf = jnp.zeros((num_x0 + 1,) + x_T.shape, jnp.float32) if num_x0 else jnp.zeros((0,), jnp.float32)
  (state, buf), _ = jax.lax.scan(body, (state, buf), jnp.arange(sampler.num_calls, dtype=jnp.int32))
  return state.x, buf[:num_x0]


def sample(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    sampler: Any,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    return_x0_at: Sequence[int] | None = None,
):
  """Run ``sampler`` from ``x_T`` [B, ...] and return the final sample (float32, x_T's shape).

  Args:
    model_fn: ``(x, t) -> output``; see the module docstring.
    sampler: a `ddx.samplers.Sampler`, e.g. from `ddx.samplers.make`.
    x_T: the initial noise, [B, ...] (may be a sharded jax.Array).
    key: PRNG key for the per-call noise (required iff ``sampler.stochastic``).
    return_x0_at: model-call indices (0 <= i < len(sampler.timesteps)) at which to also return
      the sampler's x0 prediction; then returns ``(x, x0s)`` with x0s [len, B, ...]. Memory
      is O(len(return_x0_at)), not O(steps).
  """
  x_T = jnp.asarray(x_T) if not isinstance(x_T, jax.Array) else x_T
  if x_T.ndim < 1 or x_T.shape[0] < 1:
    raise ValueError(f"x_T: expected a batch [B, ...] with B >= 1, got shape {x_T.shape}")
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T: expected a floating dtype, got {x_T.dtype}")
  if not isinstance(sampler, Sampler):
    raise ValueError(f"sampler: not a ddx sampler (got {type(sampler).__name__}); use ddx.samplers.make")
  n = int(sampler.timesteps.shape[0])
  if sampler.stochastic and key is None:
    raise ValueError("key: this sampler is stochastic; pass a PRNG key (e.g. jax.random.key(seed))")
  if key is not None and not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.dtype == jnp.uint32 and key.shape == (2,)))):
    raise ValueError(f"key: expected a PRNG key (jax.random.key or PRNGKey), got {type(key).__name__} "
                     f"{getattr(key, 'dtype', '')}{getattr(key, 'shape', '')}")
  indices = tuple(int(i) for i in (return_x0_at or ()))
  for i in indices:
    if not 0 <= i < n:
      raise ValueError(f"return_x0_at: index {i} outside [0, {n}) model calls")
  if len(set(indices)) != len(indices):
    raise ValueError("return_x0_at: indices must be distinct")
  # Check the model's output shape abstractly before building the loop: a clear message
  # instead of an XLA shape error deep inside the scan.
  try:
    out = jax.eval_shape(model_fn, jax.ShapeDtypeStruct(x_T.shape, jnp.float32),
                         jax.ShapeDtypeStruct((x_T.shape[0],), jnp.int32))
  except Exception as e:  # re-raised with context; the original is chained
    raise ValueError(f"model_fn: failed on x of shape {x_T.shape} and t of shape ({x_T.shape[0]},): {e}") from e
  ok = out.shape == x_T.shape or (out.shape[:-1] == x_T.shape[:-1] and out.shape[-1] == 2 * x_T.shape[-1])
  if not ok:
    raise ValueError(f"model_fn: output shape {out.shape} does not match x_T shape {x_T.shape} "
                     "(or twice its channels for a learned variance)")
  model_arrays, model_static = _partition(model_fn)
  sampler_arrays, sampler_static = _partition(sampler)
  slots = jnp.asarray(_x0_slots(n, indices))
  x, x0s = _run(model_arrays, sampler_arrays, x_T, key, slots,
                model_static=model_static, sampler_static=sampler_static, num_x0=len(indices))
  return (x, x0s) if return_x0_at is not None else x
