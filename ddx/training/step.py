"""Training: the train state, optimizer, EMA and the pure, jitted train step.

The step is a pure function ``(state, batches) -> (state, metrics)`` jitted over a
``("data", "fsdp")`` mesh (`ddx.parallel.make_mesh`): the batch is split over both axes;
parameters, EMA and Adam's moments are split over ``"fsdp"`` by `state_shardings` (all
replicated at fsdp = 1), and XLA inserts the all-gathers, reduce-scatters and all-reduces.
Keys come from ``fold_in(base_key, step)``, and all random draws (t, eps, dropout, label
dropout) are made for the *global* batch, so the same seed and global batch give the same
trajectory on any number of devices, hosts or mesh shapes (up to reduction order).

A non-finite loss or gradient norm leaves params, EMA and optimizer state unchanged for
that step (the step counter still advances, so the data order is unaffected) and increments
``state.nonfinite`` (consecutive) and ``state.skipped`` (total); the loop stops once too many
happen in a row. Checkpoints therefore never contain NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddx import losses, parallel
from ddx.schedules import Schedule


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: number of steps taken
  params: Any  # nnx.State of the model's nnx.Param
  ema_params: Any
  opt_state: Any
  key: jax.Array  # uint32 [2]: base key data; step keys are fold_in(key, step)
  nonfinite: jax.Array  # int32 []: consecutive skipped (non-finite) steps
  skipped: jax.Array  # int32 []: total skipped steps


OPTIMIZERS = ("adam", "adamw")
LR_DECAYS = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """Explicit optimizer settings (translated from the config's ``optim`` section)."""

  name: str = "adam"  # one of OPTIMIZERS
  learning_rate: float = 2e-4
  warmup_steps: int = 5000
  decay: str = "constant"  # one of LR_DECAYS
  total_steps: int = 800_000  # for cosine decay
  final_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclasses.dataclass(frozen=True)
class LossSpec:
  prediction: str = "eps"
  weighting: str = "uniform"
  min_snr_gamma: float = 5.0
  learned_variance: bool = False
  vlb_weight: float = 1e-3
  # flow matching (kind "flow"): the velocity objective, σ drawn by `losses.flow_draw`
  kind: str = "ddpm"
  flow_timesteps: str = "uniform"
  flow_mean: float = 0.0
  flow_std: float = 1.0
  flow_shift: float = 1.0
  # EDM (kind "edm"): the preconditioned objective, ln σ ~ N(edm_p_mean, edm_p_std²)
  edm_sigma_data: float = 0.5
  edm_p_mean: float = -1.2
  edm_p_std: float = 1.2


def learning_rate_fn(spec: OptimizerSpec) -> optax.Schedule:
  warm = optax.linear_schedule(0.0, spec.learning_rate, max(spec.warmup_steps, 1))
  if spec.decay == "constant":
    after = optax.constant_schedule(spec.learning_rate)
  elif spec.decay == "cosine":
    after = optax.cosine_decay_schedule(
      spec.learning_rate, max(spec.total_steps - spec.warmup_steps, 1), alpha=spec.final_lr_fraction
    )
  else:
    raise ValueError(f"decay: unknown {spec.decay!r}; expected one of {LR_DECAYS}")
  if spec.warmup_steps <= 0:
    return after
  return optax.join_schedules([warm, after], [spec.warmup_steps])


def make_optimizer(spec: OptimizerSpec) -> optax.GradientTransformation:
  lr = learning_rate_fn(spec)
  if spec.name == "adam":
    opt = optax.adam(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps)
  elif spec.name == "adamw":
    opt = optax.adamw(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay)
  else:
    raise ValueError(f"name: unknown optimizer {spec.name!r}; expected one of {OPTIMIZERS}")
  parts = [optax.clip_by_global_norm(spec.grad_clip)] if spec.grad_clip > 0 else []
  return optax.chain(*parts, opt)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay for the update after ``step`` steps; with warmup ``min(decay, (1+n)/(10+n))``."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def init_state(model: nnx.Module, tx: optax.GradientTransformation, key: jax.Array) -> tuple[Any, TrainState]:
  """Split ``model`` into (graphdef, TrainState at step 0). ``key`` is the run's base key."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree_util.tree_leaves(rest):
    raise ValueError("model: only nnx.Param state is supported (found other variables)")
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(
    step=zero,
    params=params,
    ema_params=jax.tree_util.tree_map(jnp.copy, params),
    opt_state=tx.init(params),
    key=jnp.asarray(key, jnp.uint32),
    nonfinite=zero,
    skipped=zero,
  )
  return graphdef, state


def _builder(model_factory, tx, params_key, key) -> Callable[[], TrainState]:
  return lambda: init_state(model_factory(nnx.Rngs(params=params_key)), tx, key)[1]


def abstract_state(
  model_factory: Callable[[nnx.Rngs], nnx.Module],
  tx: optax.GradientTransformation,
  params_key: jax.Array,
  key: jax.Array,
) -> tuple[Any, TrainState]:
  """``(graphdef, TrainState of ShapeDtypeStructs)`` of `create_state` with the same arguments:
  shapes and dtypes only, nothing drawn or allocated (for `state_shardings`, memory reports
  and ahead-of-time compiles)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_factory(nnx.Rngs(params=params_key))))
  return graphdef, jax.eval_shape(_builder(model_factory, tx, params_key, key))


def create_state(
  model_factory: Callable[[nnx.Rngs], nnx.Module],
  tx: optax.GradientTransformation,
  params_key: jax.Array,
  key: jax.Array,
  *,
  shardings: TrainState | None = None,
) -> tuple[Any, TrainState]:
  """`init_state` of ``model_factory(nnx.Rngs(params=params_key))``, built in one jitted program:
  one compilation (one compilation-cache entry) instead of one per initializer and per
  optimizer-state leaf (about a hundred small programs for a small U-Net).

  ``shardings`` None: built on this process's default device (then `place_state`). Given
  (`state_shardings`): built straight into those shardings, every device computing only its
  own shards, so a state larger than one device's memory never exists whole; with
  partitionable threefry the values do not depend on the sharding.

  The values equal an eager build's to 1 ulp (on CPU the program is compiled at LLVM O0,
  which rounds some random draws' transforms differently).
  """
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_factory(nnx.Rngs(params=params_key))))
  build = _builder(model_factory, tx, params_key, key)
  # On CPU the program runs once and its LLVM optimisation is most of its compile time: at O0
  # it compiles ~2.8x faster (7.4 s -> 2.7 s for the tiny test U-Net on a Zen 4)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  jitted = jax.jit(build) if shardings is None else jax.jit(build, out_shardings=shardings)
  return graphdef, jitted.lower().compile(compiler_options=options)()


def place_state(state: TrainState, shardings: TrainState) -> TrainState:
  """``state`` with every leaf in its sharding from ``shardings``: leaves already there are
  kept; others (built or restored on one device, the train record's scalars) are copied from
  this process's host copy (identical on every process)."""

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return parallel.place(x, sharding)

  return jax.tree_util.tree_map(put, state, shardings)


def _select(pred, new, old):
  return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)


def micro_batches(tree: Any, k: int) -> Any:
  """Split every leaf [B, ...] of ``tree`` into [k, B / k, ...]; micro-batch j holds rows
  j, j + k, j + 2k, ... A device holding a contiguous block of the batch then holds its rows
  of every micro-batch (no data moves), provided its block size is a multiple of k."""
  return jax.tree_util.tree_map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1), tree)


def accumulate(value_and_grad: Callable, params: Any, micro: Any, k: int, *, unroll: bool | None = None):
  """``(mean value, mean gradient)`` of ``value_and_grad(params, micro_j, j)`` over the k
  micro-batches of ``micro`` (leaves [k, ...]), summed in float32 one micro-batch at a time.

  A `lax.scan` on accelerators, which frees each micro-batch's activations before the next
  (temporaries / k, measured); unrolled on CPU (``unroll=None`` picks by backend), where XLA
  runs the convolutions of a backward pass inside a while loop far slower (see
  `make_train_fn`) and keeps the unrolled micro-batches' activations alive together.
  """
  if unroll is None:
    unroll = jax.default_backend() == "cpu"
  zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def add(total, j):
    v, g = value_and_grad(params, jax.tree_util.tree_map(lambda a: a[j], micro), j)
    return jax.tree_util.tree_map(lambda s, x: s + x.astype(jnp.float32), total, (v, g)), None

  if unroll:
    total = zero
    for j in range(k):
      total, _ = add(total, j)
  else:
    total, _ = jax.lax.scan(add, zero, jnp.arange(k))
  value, grads = jax.tree_util.tree_map(lambda s: s / k, total)
  return value, jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)


def gather_params(params: Any, param_shardings: Any | None) -> Any:
  """The parameters whole on every device for the forward and backward passes (FSDP's
  all-gather); as they are when ``param_shardings`` is None.

  Said explicitly rather than left to XLA's sharding propagation: propagated from the
  parameters, an fsdp split can spread into the activations (measured on the SD-1.5 U-Net at
  fsdp 16: "involuntary full rematerialization" of GroupNorm reductions), while whole weights
  leave the activations split by the batch alone."""
  if param_shardings is None:
    return params
  whole = jax.tree_util.tree_map(lambda s: NamedSharding(s.mesh, P()), param_shardings)
  return jax.lax.with_sharding_constraint(params, whole)


def scatter_grads(grads: Any, param_shardings: Any | None) -> Any:
  """Gradients in the parameters' shardings (FSDP's reduce-scatter); as they are when
  ``param_shardings`` is None."""
  return grads if param_shardings is None else jax.lax.with_sharding_constraint(grads, param_shardings)


def train_step(
  state: TrainState,
  batch: dict,
  *,
  graphdef,
  sched: Schedule,
  tx: optax.GradientTransformation,
  lr_fn: Callable,
  loss: LossSpec,
  ema_decay: float,
  ema_warmup: bool,
  num_classes: int | None,
  label_dropout: float,
  use_dropout: bool,
  grad_accum: int = 1,
  accum_unroll: bool | None = None,
  param_shardings: Any | None = None,
) -> tuple[TrainState, dict]:
  """One optimisation step on a global batch ``{"image": [B,H,W,C], "label": [B]}`` (pure).

  ``param_shardings`` (FSDP): the parameters' shardings; the step gathers them whole once
  (`gather_params`, shared by the micro-batches) and returns the gradients to them
  (`scatter_grads`). None: nothing is said, as for replicated parameters.

  ``grad_accum`` = k > 1 computes the gradient over k micro-batches of B / k examples
  (`micro_batches`, `accumulate`) and applies one update: the same step as k = 1 up to
  float32 summation order, with one micro-batch's activation memory when scanned. The draws of t, eps and
  label dropout are made for the whole batch first, so they are those of k = 1; only dropout
  inside the network draws per micro-batch (``fold_in(dropout_key, j)``). ``accum_unroll``:
  see `accumulate` (None: unrolled on CPU, where XLA then keeps every micro-batch's
  activations alive together, so only the scan saves memory; measured in
  benchmarks/grad_accum_memory.py).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  x0 = batch["image"]
  y = None
  if num_classes:
    y = batch["label"].astype(jnp.int32)
    if label_dropout > 0:
      drop = jax.random.bernoulli(jax.random.fold_in(key, 2), label_dropout, y.shape)
      y = jnp.where(drop, num_classes, y)
  dropout_key = jax.random.fold_in(key, 3) if use_dropout else None
  if loss.kind == "flow":
    t, eps = losses.flow_draw(
      x0,
      jax.random.fold_in(key, 1),
      timesteps=loss.flow_timesteps,
      mean=loss.flow_mean,
      std=loss.flow_std,
      shift=loss.flow_shift,
    )
  elif loss.kind == "edm":
    t, eps = losses.edm_draw(x0, jax.random.fold_in(key, 1), p_mean=loss.edm_p_mean, p_std=loss.edm_p_std)
  else:
    t, eps = losses.draw_noise(sched, x0, jax.random.fold_in(key, 1))

  def loss_fn(params, part, dropout_key):
    model = nnx.merge(graphdef, params)
    model_fn = lambda x, t: model(x, t, part["y"], dropout_key=dropout_key)
    if loss.kind == "flow":  # t holds σ here
      return jnp.mean(losses.flow_loss(model_fn, part["x0"], part["t"], part["eps"], sched.num_timesteps))
    if loss.kind == "edm":  # t holds σ, eps the noise n
      return jnp.mean(losses.edm_loss(model_fn, part["x0"], part["t"], part["eps"], loss.edm_sigma_data))
    per_example = losses.noised_loss(
      model_fn,
      sched,
      part["x0"],
      part["t"],
      part["eps"],
      prediction=loss.prediction,
      weighting=loss.weighting,
      min_snr_gamma=loss.min_snr_gamma,
      learned_variance=loss.learned_variance,
      vlb_weight=loss.vlb_weight,
    )
    return jnp.mean(per_example)

  whole = {"x0": x0, "t": t, "eps": eps, "y": y}
  params = gather_params(state.params, param_shardings)
  if grad_accum == 1:
    value, grads = jax.value_and_grad(loss_fn)(params, whole, dropout_key)
  else:

    def micro_value_and_grad(params, part, j):
      key_j = None if dropout_key is None else jax.random.fold_in(dropout_key, j)
      return jax.value_and_grad(loss_fn)(params, part, key_j)

    value, grads = accumulate(
      micro_value_and_grad, params, micro_batches(whole, grad_accum), grad_accum, unroll=accum_unroll
    )
  grads = scatter_grads(grads, param_shardings)
  return apply_gradients(state, value, grads, tx=tx, lr_fn=lr_fn, ema_decay=ema_decay, ema_warmup=ema_warmup)


def apply_gradients(
  state: TrainState,
  value: jax.Array,
  grads: Any,
  *,
  tx: optax.GradientTransformation,
  lr_fn: Callable,
  ema_decay: float,
  ema_warmup: bool,
) -> tuple[TrainState, dict]:
  """The update every objective shares: optimizer step, EMA, and the non-finite skip (a
  non-finite ``value`` or gradient norm leaves params, EMA and optimizer state unchanged)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  d = ema_decay_at(state.step, ema_decay, ema_warmup)
  ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  new = state.replace(
    step=state.step + 1,
    params=_select(finite, params, state.params),
    ema_params=_select(finite, ema, state.ema_params),
    opt_state=_select(finite, opt_state, state.opt_state),
    nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
    skipped=state.skipped + jnp.where(finite, 0, 1),
  )
  metrics = {"loss": value, "grad_norm": grad_norm, "lr": lr_fn(state.step), "finite": finite}
  return new, metrics


def make_train_fn(
  mesh: Mesh,
  steps_per_call: int,
  *,
  unroll: bool | None = None,
  shardings: TrainState | None = None,
  step_fn: Callable = train_step,
  **step_kwargs,
):
  """Jit ``steps_per_call`` train steps over ``mesh``; the state buffer is donated.

  ``shardings``: the state's (`state_shardings`), kept from input to output; None replicates
  the whole state (plain data parallelism, the program of a mesh without an fsdp axis).

  ``step_fn(state, batch, **step_kwargs) -> (state, metrics)`` is the objective's step: the
  diffusion `train_step` by default (`ddx.training.autoencoder.train_step` for autoencoders).

  Input batches carry a leading step axis: ``{"image": [K, B, H, W, C], "label": [K, B]}``
  sharded ``P(None, ("data", "fsdp"))`` (`ddx.parallel.batch_axes`).
  Returns ``fn(state, batches) -> (state, metrics [K])``.

  The K steps are a ``lax.scan`` on accelerators. On CPU they are unrolled in Python
  (``unroll=None`` picks by backend): XLA:CPU leaves the convolutions of a backward pass
  inside a while loop in their non-canonical layouts and runs them ~35x slower (measured:
  0.47 s vs 16.7 s for one U-Net gradient), so unrolling trades compile time for speed.
  """
  step = functools.partial(step_fn, **step_kwargs)
  if unroll is None:
    unroll = jax.default_backend() == "cpu"

  def many(state, batches):
    if not unroll:
      return jax.lax.scan(step, state, batches, length=steps_per_call)
    metrics = []
    for k in range(steps_per_call):
      state, m = step(state, jax.tree_util.tree_map(lambda b: b[k], batches))
      metrics.append(m)
    return state, jax.tree_util.tree_map(lambda *ms: jnp.stack(ms), *metrics)

  repl = NamedSharding(mesh, P())
  state_sh = repl if shardings is None else shardings
  data = NamedSharding(mesh, P(None, parallel.batch_axes(mesh)))
  return jax.jit(many, in_shardings=(state_sh, data), out_shardings=(state_sh, repl), donate_argnums=(0,))


def state_shardings(state: TrainState, mesh: Mesh, tx: optax.GradientTransformation, rules=None) -> TrainState:
  """A TrainState of `NamedSharding`: parameters by the rule table (`ddx.parallel.param_spec`
  on ``mesh``'s ``"fsdp"`` axis), EMA and the optimizer's per-parameter state (Adam's moments)
  exactly as their parameters, everything else (step, key, counters, Adam's count)
  replicated. ``state`` may be abstract (`jax.eval_shape`)."""
  rules = parallel.ShardingRules() if rules is None else rules
  repl = NamedSharding(mesh, P())
  params = parallel.param_shardings(state.params, mesh, rules)
  opt = optax.tree_map_params(
    tx,
    lambda _, s: s,
    state.opt_state,
    params,
    transform_non_params=lambda sub: jax.tree_util.tree_map(lambda _: repl, sub),
  )
  return state.replace(
    step=repl, params=params, ema_params=params, opt_state=opt, key=repl, nonfinite=repl, skipped=repl
  )


def checkpoint_items(state: TrainState) -> dict:
  """The checkpoint items of a TrainState (see `ddx.training.checkpoint`): params, EMA, optimizer state
  and a JSON ``train`` record (step, base key data, non-finite counters)."""
  train = {
    "step": int(jax.device_get(state.step)),
    "key": parallel.host_key_data(state.key).tolist(),
    "nonfinite": int(jax.device_get(state.nonfinite)),
    "skipped": int(jax.device_get(state.skipped)),
  }
  return {"params": state.params, "ema_params": state.ema_params, "opt_state": state.opt_state, "train": train}


def checkpoint_targets(template: TrainState) -> dict:
  """Restore targets shaped (and sharded) like ``template``, for `ddx.training.checkpoint.Checkpointer.restore`."""
  return {"params": template.params, "ema_params": template.ema_params, "opt_state": template.opt_state, "train": None}


def state_from_checkpoint(template: TrainState, items: dict, step: int) -> TrainState:
  """Rebuild a TrainState from restored items (ValueError if the record disagrees with ``step``)."""
  tr = items["train"]
  if int(tr["step"]) != int(step):
    raise ValueError(f"corrupt checkpoint at step {step}: its train record says step {tr['step']}")
  params = template.params
  params.replace_by_pure_dict(items["params"])
  ema = template.ema_params
  ema.replace_by_pure_dict(items["ema_params"])
  return template.replace(
    step=jnp.asarray(tr["step"], jnp.int32),
    params=params,
    ema_params=ema,
    opt_state=items["opt_state"],
    key=jnp.asarray(np.asarray(tr["key"], np.uint32)),
    nonfinite=jnp.asarray(tr["nonfinite"], jnp.int32),
    skipped=jnp.asarray(tr["skipped"], jnp.int32),
  )
