"""The sampling driver: one jitted ``lax.scan`` over a sampler's model calls.

    x0 = ddx.sample(model_fn, sampler, x_T, key)

* ``model_fn(x, t) -> output``: x float32 [B, ...], t [B] (the sampler's timestep for this
  call, broadcast over the batch: int32 for DDPM / DDIM / PLMS / DPM-Solver++, float32 for the
  σ-space samplers, whose x is the σ-space sample rescaled to the variance the model was
  trained on, ``x_σ / sqrt(σ² + 1)``; see ``Sampler.model_input``). Its output is eps / x0 / v as the sampler was built
  for, of x's shape (or twice its channels for a learned variance, channels-last).
  ``model_fn`` may be a plain function, a ``jax.tree_util.Partial`` or an ``nnx.Module``:
  its array leaves (e.g. parameters) are passed to the compiled program as arguments, not
  baked in as constants; everything else is static.
* The noise of call i is ``normal(fold_in(key, i), x.shape)``; deterministic samplers draw
  none and accept ``key=None``. With ``jax_threefry_partitionable`` (the default) the draws
  do not depend on how x_T is sharded.
* Compiled once per (shapes, sampler structure, model structure): the loop body is traced
  once, so compile time does not grow with the number of steps.

Editing (``ddx.edit``) runs through the same scan with three optional arguments:

* ``start=k`` begins at model call k from x_T (SDEdit / img2img);
* ``hook(x, i, e) -> x`` is applied to the sample right after the sampler step of model
  call i (entry e of the run), e.g. to paste a forward-noised copy of known pixels at the
  new level (inpainting);
* ``plan``: an explicit run of entries, each a model call (index i into the sampler's
  tables) or a forward "undo" of call i, ``x <- coef_x x + coef_z z`` (RePaint). Entry e
  draws its noise from ``fold_in(key, e)``; a plan ``0..N-1`` without undo entries is plain
  sampling, bitwise. Plans are array leaves: a new plan of the same length does not retrace.

Resumed runs (``start > 0``) and plans need a sampler whose step depends on the current
sample only (DDPM, DDIM): the multistep samplers' history would be wrong after a jump.

`make_sample_fn` builds on `sample` what the training loop's sample grids, ``ddx sample``
and ``ddx eval`` share: a function of (parameters, key, shape, labels) that draws x_T and
samples with the batch sharded over a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx import edm, guidance, parallel
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


@dataclasses.dataclass(frozen=True)
class Plan:
  """An explicit run: entry e is model call ``calls[e]`` (``up[e]`` False) or the forward
  undo of call ``calls[e]``: ``x <- coef_x[e] x + coef_z[e] z`` (``up[e]`` True), which moves
  the sample from the level after call i back to the level of call i. Host numpy arrays [M]."""

  calls: np.ndarray
  up: np.ndarray
  coef_x: np.ndarray
  coef_z: np.ndarray

  @classmethod
  def calls_only(cls, calls) -> "Plan":
    calls = np.asarray(calls, np.int32)
    z = np.zeros(calls.shape, np.float32)
    return cls(calls, np.zeros(calls.shape, bool), z, z)

  def __len__(self) -> int:
    return int(self.calls.shape[0])


def _slots(plan: Plan, indices: Sequence[int]) -> np.ndarray:
  """Buffer slot per entry: the position of its call in ``indices`` (len(indices) = scratch)."""
  pos = {i: j for j, i in enumerate(indices)}
  return np.asarray(
    [len(indices) if u else pos.get(int(c), len(indices)) for c, u in zip(plan.calls, plan.up)], np.int32
  )


def _x0_slots(num_calls: int, indices: Sequence[int]) -> np.ndarray:
  return _slots(Plan.calls_only(np.arange(num_calls)), indices)


def _report(progress, total, e):
  progress(int(e) + 1, total)


@functools.partial(
  jax.jit, static_argnames=("model_static", "sampler_static", "num_x0", "hook_static", "num_x", "has_up", "progress")
)
def _run(
  model_arrays,
  sampler_arrays,
  x_T,
  key,
  x0_slots,
  plan=None,
  hook_arrays=(),
  x_slots=None,
  *,
  model_static,
  sampler_static,
  num_x0,
  hook_static=None,
  num_x=0,
  has_up=False,
  progress=None,
):
  model_fn = model_static.combine(model_arrays)
  sampler = sampler_static.combine(sampler_arrays)
  hook = hook_static.combine(hook_arrays) if hook_static is not None else None
  batch = x_T.shape[0]
  if plan is None:
    entries = jnp.arange(sampler.num_calls, dtype=jnp.int32)
    plan = (entries, entries, None, None, None)
  total = int(plan[0].shape[0])

  def call(state, i, e):
    noise = jax.random.normal(jax.random.fold_in(key, e), state.x.shape, jnp.float32) if sampler.stochastic else None
    x_in, t = sampler.model_input(state, i, noise)
    out = model_fn(x_in, jnp.broadcast_to(t, (batch,)))
    state = sampler.step(state, out, i, noise)
    if hook is not None:
      state = state._replace(x=hook(state.x, i, e))
    return state

  def undo(state, e, cx, cz):
    z = jax.random.normal(jax.random.fold_in(key, e), state.x.shape, jnp.float32)
    return state._replace(x=cx * state.x + cz * z)

  def body(carry, xs):
    state, buf, xbuf = carry
    e, i, up, cx, cz = xs
    if has_up:
      state = jax.lax.cond(up, lambda s: undo(s, e, cx, cz), lambda s: call(s, i, e), state)
    else:
      state = call(state, i, e)
    if num_x0:
      buf = jax.lax.dynamic_update_index_in_dim(buf, state.x0, x0_slots[e], 0)
    if num_x:
      xbuf = jax.lax.dynamic_update_index_in_dim(xbuf, state.x, x_slots[e], 0)
    if progress is not None:
      jax.debug.callback(functools.partial(_report, progress, total), e)
    return (state, buf, xbuf), None

  state = sampler.init(x_T)
  empty = jnp.zeros((0,), jnp.float32)
  buf = jnp.zeros((num_x0 + 1,) + x_T.shape, jnp.float32) if num_x0 else empty
  xbuf = jnp.zeros((num_x + 1,) + x_T.shape, jnp.float32) if num_x else empty
  (state, buf, xbuf), _ = jax.lax.scan(body, (state, buf, xbuf), plan)
  return state.x, buf[:num_x0], xbuf[:num_x]


def _check_key(key, required: bool):
  if required and key is None:
    raise ValueError("key: this sampler is stochastic; pass a PRNG key (e.g. jax.random.key(seed))")
  if key is not None and not (
    isinstance(key, jax.Array)
    and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,)))
  ):
    raise ValueError(
      f"key: expected a PRNG key (jax.random.key or PRNGKey), got {type(key).__name__} "
      f"{getattr(key, 'dtype', '')}{getattr(key, 'shape', '')}"
    )


def _check_plan(plan: Plan, n: int) -> None:
  calls, up = np.asarray(plan.calls), np.asarray(plan.up)
  shapes = {a.shape for a in (calls, up, np.asarray(plan.coef_x), np.asarray(plan.coef_z))}
  if len(shapes) != 1 or calls.ndim != 1 or calls.shape[0] < 1:
    raise ValueError(f"plan: expected four 1-D arrays of one length >= 1, got shapes {sorted(shapes)}")
  if calls.min() < 0 or calls.max() >= n:
    raise ValueError(f"plan: call indices must lie in [0, {n}), got min {calls.min()} max {calls.max()}")


def _check_indices(name: str, indices: Sequence[int], plan: Plan | None, n: int) -> None:
  for i in indices:
    if not 0 <= i < n:
      raise ValueError(f"{name}: index {i} outside [0, {n}) model calls")
  if len(set(indices)) != len(indices):
    raise ValueError(f"{name}: indices must be distinct")
  if plan is not None:
    visited = set(int(c) for c, u in zip(plan.calls, plan.up) if not u)
    missing = [i for i in indices if i not in visited]
    if missing:
      raise ValueError(f"{name}: model call {missing[0]} is not part of this run")


def sample(
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  sampler: Any,
  x_T: jax.Array,
  key: jax.Array | None = None,
  *,
  return_x0_at: Sequence[int] | None = None,
  return_x_at: Sequence[int] | None = None,
  start: int = 0,
  hook: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
  plan: Plan | None = None,
  progress: Callable[[int, int], None] | None = None,
):
  """Run ``sampler`` from ``x_T`` [B, ...] and return the final sample (float32, x_T's shape).

  Args:
    model_fn: ``(x, t) -> output``; see the module docstring.
    sampler: a `ddx.samplers.Sampler`, e.g. from `ddx.samplers.make`.
    x_T: the initial sample, [B, ...] (may be a sharded jax.Array): standard normal for every
      sampler (a σ-space sampler scales it to its first noise level itself); with ``start=k``
      it is the sample at the level of model call k.
    key: PRNG key for the per-entry noise (required iff the sampler is stochastic or the plan
      has undo entries).
    return_x0_at: model-call indices (0 <= i < len(sampler.timesteps)) at which to also return
      the sampler's x0 prediction (the last visit's, under a plan that revisits a call).
    return_x_at: likewise, the sample right after those calls (after ``hook``).
      With either, returns ``(x, x0s)``, ``(x, xs)`` or ``(x, x0s, xs)`` (in that order), each
      [len, B, ...]. Memory is O(len(indices)), not O(steps).
    start: first model call (0 <= start < N); the run is calls start..N-1.
    hook: ``(x, i, e) -> x`` after each sampler step (i the call, e the entry, int32 scalars);
      a plain function or a ``jax.tree_util.Partial`` (its arrays are traced arguments).
    plan: an explicit `Plan` (excludes ``start``).
    progress: ``progress(done, total)`` called on the host after each entry from inside the
      compiled loop (``jax.debug.callback``); nothing is recompiled per report.
  """
  x_T = jnp.asarray(x_T) if not isinstance(x_T, jax.Array) else x_T
  if x_T.ndim < 1 or x_T.shape[0] < 1:
    raise ValueError(f"x_T: expected a batch [B, ...] with B >= 1, got shape {x_T.shape}")
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T: expected a floating dtype, got {x_T.dtype}")
  if not isinstance(sampler, Sampler):
    raise ValueError(f"sampler: not a ddx sampler (got {type(sampler).__name__}); use ddx.samplers.make")
  n = int(sampler.timesteps.shape[0])
  if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or not 0 <= start < n:
    raise ValueError(f"start: must be an integer in [0, {n}), got {start!r}")
  if plan is not None and start:
    raise ValueError(f"start: give either start or plan, got start={start} and a plan")
  if start:
    plan = Plan.calls_only(np.arange(start, n))
  if plan is not None:
    _check_plan(plan, n)
    if not sampler.single_step:
      raise ValueError(
        f"sampler: a run that starts mid-grid or revisits calls needs a single-step sampler "
        f"(DDPM, DDIM), got {type(sampler).__name__}; build it on the sub-grid instead "
        "(timesteps=...)"
      )
  has_up = plan is not None and bool(np.any(plan.up))
  _check_key(key, sampler.stochastic or has_up)
  indices = tuple(int(i) for i in (return_x0_at or ()))
  x_indices = tuple(int(i) for i in (return_x_at or ()))
  _check_indices("return_x0_at", indices, plan, n)
  _check_indices("return_x_at", x_indices, plan, n)
  # Check the model's output shape abstractly before building the loop: a clear message
  # instead of an XLA shape error deep inside the scan.
  try:
    out = jax.eval_shape(
      model_fn,
      jax.ShapeDtypeStruct(x_T.shape, jnp.float32),
      jax.ShapeDtypeStruct((x_T.shape[0],), sampler.timesteps.dtype),
    )
  except Exception as e:  # re-raised with context; the original is chained
    raise ValueError(f"model_fn: failed on x of shape {x_T.shape} and t of shape ({x_T.shape[0]},): {e}") from e
  ok = out.shape == x_T.shape or (out.shape[:-1] == x_T.shape[:-1] and out.shape[-1] == 2 * x_T.shape[-1])
  if not ok:
    raise ValueError(
      f"model_fn: output shape {out.shape} does not match x_T shape {x_T.shape} "
      "(or twice its channels for a learned variance)"
    )
  if hook is not None:
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    try:
      h = jax.eval_shape(hook, jax.ShapeDtypeStruct(x_T.shape, jnp.float32), scalar, scalar)
    except Exception as e:  # re-raised with context; the original is chained
      raise ValueError(f"hook: failed on x of shape {x_T.shape}: {e}") from e
    if h.shape != x_T.shape:
      raise ValueError(f"hook: output shape {h.shape} does not match x_T shape {x_T.shape}")
  model_arrays, model_static = _partition(model_fn)
  sampler_arrays, sampler_static = _partition(sampler)
  run_plan = plan or Plan.calls_only(np.arange(n))
  kwargs = {}
  if plan is not None:
    kwargs["plan"] = (
      jnp.arange(len(plan), dtype=jnp.int32),
      jnp.asarray(plan.calls, jnp.int32),
      jnp.asarray(plan.up, bool),
      jnp.asarray(plan.coef_x, jnp.float32),
      jnp.asarray(plan.coef_z, jnp.float32),
    )
  if hook is not None:
    kwargs["hook_arrays"], kwargs["hook_static"] = _partition(hook)
  if x_indices:
    kwargs["x_slots"], kwargs["num_x"] = jnp.asarray(_slots(run_plan, x_indices)), len(x_indices)
  if has_up:
    kwargs["has_up"] = True
  if progress is not None:
    kwargs["progress"] = progress
  slots = jnp.asarray(_slots(run_plan, indices))
  x, x0s, xs = _run(
    model_arrays,
    sampler_arrays,
    x_T,
    key,
    slots,
    model_static=model_static,
    sampler_static=sampler_static,
    num_x0=len(indices),
    **kwargs,
  )
  extra = ((x0s,) if return_x0_at is not None else ()) + ((xs,) if return_x_at is not None else ())
  return (x, *extra) if extra else x


@functools.partial(jax.jit, static_argnames=("shape", "sharding"))
def initial_noise(key, *, shape, sharding):
  """Standard normal x_T drawn inside jit straight into ``sharding`` (every process makes its
  own shards; with partitionable threefry the values do not depend on the sharding)."""
  return jax.lax.with_sharding_constraint(jax.random.normal(key, shape, jnp.float32), sharding)


def make_sample_fn(
  graphdef,
  sampler,
  num_classes: int | None,
  mesh,
  guidance_scale: float = 1.0,
  *,
  guidance_rescale: float = 0.0,
  guidance_interval: tuple[float, float] | None = None,
  sched=None,
  edm_sigma_data: float | None = None,
):
  """``fn(params, key, shape, labels=None) -> samples [shape]``, batch sharded over ``mesh``.

  ``graphdef`` / ``params``: an ``nnx.split`` model ``model(x, t[, y])``. ``labels`` int [N]
  (class-conditional models; None = the null label) select the classes; ``guidance_scale != 1``
  applies classifier-free guidance (with ``guidance_rescale`` and a σ ``guidance_interval`` on
  ``sched``, `ddx.guidance.for_labels`); ``edm_sigma_data``: the network is EDM-preconditioned
  (`ddx.edm.precondition`), for the edm samplers. x_T comes from ``fold_in(key, 0)`` and the sampler's
  noise from ``fold_in(key, 1)``. A batch that the mesh does not divide is replicated.
  """

  def fn(params, key, shape, labels=None):
    model = nnx.merge(graphdef, params)
    if edm_sigma_data is not None:
      model = edm.precondition(model, edm_sigma_data)
    model_fn = guidance.for_labels(
      model,
      num_classes,
      shape[0],
      labels,
      guidance_scale,
      rescale=guidance_rescale,
      guidance_interval=guidance_interval,
      sched=sched,
    )
    sharding = parallel.batch_sharding(mesh) if shape[0] % mesh.devices.size == 0 else parallel.replicated(mesh)
    x_T = initial_noise(jax.random.fold_in(key, 0), shape=tuple(shape), sharding=sharding)
    return sample(model_fn, sampler, x_T, jax.random.fold_in(key, 1))

  return fn
