"""The training loop: data, jitted steps, logging, sample grids, sample quality, checkpoints,
preemption.

`run` takes explicit arguments (translated from a config by the ``train`` entrypoint). It
resumes from the latest complete checkpoint in the workdir, so rerunning the same command
continues a stopped run; the batch at step k depends only on (seed, k), so the resumed run
is bitwise identical to one that never stopped. SIGTERM (or orbax's preemption signal)
saves a checkpoint and returns cleanly. Only process 0 prints, logs and writes images;
every process takes part in the (sharded) sampling of sample grids and evaluations.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ddx import data, guidance, images, parallel, samplers
from ddx.eval import quality
from ddx.sampling import make_sample_fn
from ddx.training import autoencoder as autoencoder_train
from ddx.training import checkpoint, report, workdir_lock
from ddx.training import step as train_lib
from ddx.training.run_log import MetricWriter


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite steps."""


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  seed: int
  global_batch_size: int
  total_steps: int
  steps_per_call: int = 1
  grad_accum: int = 1
  random_flip: bool = False
  num_threads: int = 0
  ema_decay: float = 0.9999
  ema_warmup: bool = False
  label_dropout: float = 0.0
  log_every_seconds: float = 5.0
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  keep_period: int = 0
  sample_every: int = 0
  eval_every: int = 0
  max_nonfinite: int = 10
  fsdp: int = 1  # the mesh's "fsdp" axis size when `run` makes the mesh
  sharding_rules: parallel.ShardingRules = parallel.ShardingRules()
  peak_tflops: float | None = None  # per device, for MFU when the device kind is not in report.PEAK_TFLOPS


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  sampler: str = "ddim"
  steps: int = 50
  num: int = 64
  sampler_kwargs: dict = dataclasses.field(default_factory=dict)
  guidance: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """Sample quality every ``LoopSpec.eval_every`` steps (`ddx.eval.quality.measure`, EMA weights).

  ``net`` / ``reference``: the feature network and the training data's statistics under it
  (with features); ``sampler`` / ``steps`` / ``sampler_kwargs`` as `ddx.samplers.make`.
  """

  net: Any
  reference: Any
  sampler: str = "ddim"
  steps: int = 50
  sampler_kwargs: dict = dataclasses.field(default_factory=dict)
  num: int = 1000
  batch: int = 250


# metrics.jsonl / TensorBoard names of the evaluation results
EVAL_METRICS = ("fd", "kid_mean", "kid_std", "precision", "recall")


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run(
  workdir: str,
  config: dict,
  *,
  model_factory: Callable[[nnx.Rngs], nnx.Module],
  num_classes: int | None,
  use_dropout: bool,
  source: Any,
  sched,
  optim: train_lib.OptimizerSpec,
  loss: train_lib.LossSpec | autoencoder_train.AutoencoderLossSpec,
  loop: LoopSpec,
  sample: SampleSpec,
  evaluation: EvalSpec | None = None,
  mesh=None,
  stop_after_steps: int | None = None,
  decode: Callable[[Any], np.ndarray] | None = None,
) -> dict:
  """Train (or resume) in ``workdir``; returns a summary dict.

  ``loss`` selects the objective: a `ddx.training.step.LossSpec` trains the diffusion model
  ``model_factory`` makes; an `ddx.training.autoencoder.AutoencoderLossSpec` trains an
  autoencoder (``sched``, ``num_classes`` and sample grids unused). ``decode`` maps sampled
  latents to images in [-1, 1] for the sample grids of a latent diffusion model.

  With ``loop.eval_every > 0`` (then ``evaluation`` is required) the sample quality of the
  EMA weights is measured every ``eval_every`` steps and written as ``eval/fd``,
  ``eval/kid_mean``, ``eval/kid_std``, ``eval/precision``, ``eval/recall`` (metrics.jsonl and
  TensorBoard); the samples' keys are ``fold_in(fold_in(key(seed), 3), step)``.

  ``stop_after_steps`` ends this invocation early after that many steps (a checkpoint is
  written), as a preemption would; used by tests and for time-boxed jobs.
  """
  if loop.eval_every and evaluation is None:
    raise ValueError("evaluation: required when loop.eval_every > 0")
  mesh = mesh if mesh is not None else parallel.make_mesh(loop.fsdp)
  parallel.check_batch(loop.global_batch_size, mesh, "train.global_batch_size")
  if loop.grad_accum > 1:
    micro = loop.global_batch_size // loop.grad_accum
    parallel.check_batch(micro, mesh, f"train.grad_accum: the micro-batch (global_batch_size / {loop.grad_accum})")
    if isinstance(loss, autoencoder_train.AutoencoderLossSpec):
      raise ValueError("train.grad_accum: gradient accumulation is for diffusion models; use 1 for an autoencoder")
  # one run per workdir: a second trainer is refused before it writes anything
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  busy = None
  if lock is not None:
    try:
      lock.acquire()
    except workdir_lock.WorkdirBusy as e:
      busy = e
  if _agree(busy is not None):  # every process refuses, not just process 0
    raise busy or workdir_lock.WorkdirBusy(f"workdir {workdir}: another training run is using it (see process 0)")
  try:
    writer = MetricWriter(workdir)
    if jax.process_index() == 0:
      checkpoint.write_config(workdir, config)
    base = jax.random.key(loop.seed)
    tx = train_lib.make_optimizer(optim)
    params_key, state_key = jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
    _, abstract = train_lib.abstract_state(model_factory, tx, params_key, state_key)
    shardings = train_lib.state_shardings(abstract, mesh, tx, loop.sharding_rules)
    sharded = dict(mesh.shape).get(parallel.FSDP, 1) > 1
    # fsdp = 1: built on one device and replicated (the program of a data-parallel mesh);
    # sharded: built straight into its shards (the whole state may not fit one device)
    graphdef, state = train_lib.create_state(
      model_factory, tx, params_key, state_key, shardings=shardings if sharded else None
    )
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=loop.keep_checkpoints, keep_period=loop.keep_period)
    start, state = _resume(ckpt, state, workdir)
    if start is not None:
      writer.truncate_after(start)
    state = train_lib.place_state(state, shardings)
    step = int(jax.device_get(state.step))
    K = loop.steps_per_call
    if step % K:
      raise ValueError(f"train.steps_per_call: checkpoint step {step} is not a multiple of {K}")
    train_fn = train_function(
      mesh,
      shardings if sharded else None,
      graphdef,
      tx=tx,
      optim=optim,
      loss=loss,
      loop=loop,
      sched=sched,
      num_classes=num_classes,
      use_dropout=use_dropout,
    )
    # an EDM model samples through its preconditioning (ddx.edm)
    edm_sigma_data = loss.edm_sigma_data if getattr(loss, "kind", "ddpm") == "edm" else None
    sample_fn = None
    if loop.sample_every:
      sampler = samplers.make(sample.sampler, sched, sample.steps, **sample.sampler_kwargs)
      sample_fn = make_sample_fn(graphdef, sampler, num_classes, mesh, sample.guidance, edm_sigma_data=edm_sigma_data)
    eval_fn = None
    if loop.eval_every:
      eval_sampler = samplers.make(evaluation.sampler, sched, evaluation.steps, **evaluation.sampler_kwargs)
      eval_fn = make_sample_fn(graphdef, eval_sampler, num_classes, mesh, edm_sigma_data=edm_sigma_data)
    p_index, p_count = data.process_slice(mesh, loop.global_batch_size)
    batches = data.make_batches(
      source,
      seed=loop.seed,
      global_batch_size=loop.global_batch_size,
      start_step=step,
      process_index=p_index,
      process_count=p_count,
      random_flip=loop.random_flip,
      num_threads=loop.num_threads,
    )
    data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.batch_axes(mesh)))
    kind = jax.devices()[0].device_kind
    peak = report.peak_tflops(kind, loop.peak_tflops)
    state_report = report.state_bytes(state, shardings)
    flops_per_step = None

    stop = {"signal": None}

    def on_term(signum, _frame):
      stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    _log(
      f"ddx train: {n_params:,} parameters, {jax.device_count()} devices ({jax.process_count()} processes), "
      f"global batch {loop.global_batch_size}, steps {step} -> {loop.total_steps}, workdir {workdir}"
    )
    t_start = t_log = time.time()
    step_at_log, step_at_start = step, step
    acc = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
    end = loop.total_steps if stop_after_steps is None else min(loop.total_steps, step + stop_after_steps)
    preempted = False
    train_step = None
    # from here on a process that dies must not leave the others waiting in a collective
    watchdog = parallel.PeerWatchdog("train").start()
    try:
      while step < end:
        local = [next(batches) for _ in range(K)]
        stacked = {k: np.stack([b[k] for b in local]) for k in ("image", "label")}
        glob = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in stacked.items()}
        if train_step is None:  # processes meet after compiling, before the first collective
          train_step = parallel.compile_then_meet(train_fn, state, glob, name="train_step_compiled")
          stats = report.compiled_stats(train_step)
          flops_per_step = stats.flops / K
          for line in report.format_report(
            state_report, stats, steps_per_call=K, mesh_shape=dict(mesh.shape), device_kind=kind, peak=peak
          ):
            _log(line)
        state, metrics = train_step(state, glob)
        step += K
        m = jax.device_get(metrics)
        finite = m["finite"]
        if finite.any():
          acc["loss"] += float(np.sum(m["loss"][finite]))
          acc["grad_norm"] += float(np.sum(m["grad_norm"][finite]))
          acc["n"] += int(finite.sum())
        nonfinite = int(jax.device_get(state.nonfinite))
        if nonfinite >= loop.max_nonfinite:
          last = ckpt.latest_step()
          raise TrainingDiverged(
            f"training diverged: {nonfinite} consecutive non-finite steps at step {step} (updates were skipped; "
            f"the last checkpoint, step {last}, is intact)"
          )
        now = time.time()
        if now - t_log >= loop.log_every_seconds or step >= end:
          rate = (step - step_at_log) / max(now - t_log, 1e-9)
          n = max(acc["n"], 1)
          vals = {
            "loss": acc["loss"] / n,
            "grad_norm": acc["grad_norm"] / n,
            "lr": float(m["lr"][-1]),
            "steps_per_sec": rate,
            "images_per_sec": rate * loop.global_batch_size,
            "skipped": int(jax.device_get(state.skipped)),
            **report.achieved(flops_per_step, rate, peak),
          }
          mfu = f" (MFU {vals['mfu']:.1%})" if "mfu" in vals else ""
          eta = (loop.total_steps - step) / max((step - step_at_start) / (now - t_start), 1e-9)
          _log(
            f"step {step:>7d}/{loop.total_steps}  loss {vals['loss']:.4f}  grad {vals['grad_norm']:.3f}  "
            f"lr {vals['lr']:.2e}  {rate:.2f} steps/s  {vals['images_per_sec']:.0f} img/s  "
            f"{vals['tflops_per_device']:.3g} TFLOP/s/device{mfu}  eta {_fmt_time(eta)}"
          )
          writer.scalars(step, vals)
          acc = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
          t_log, step_at_log = now, step
        if sample_fn is not None and step % loop.sample_every == 0:
          _write_samples(sample_fn, state, step, workdir, writer, sample, num_classes, base, source.image_shape, decode)
        if eval_fn is not None and step % loop.eval_every == 0:
          t_eval = time.time()
          _evaluate(eval_fn, state, step, writer, evaluation, num_classes, base, source.image_shape)
          t_log += time.time() - t_eval  # keep the evaluation out of the next steps/s
        preempt = _agree(stop["signal"] is not None) or ckpt.reached_preemption(step)
        if step % loop.checkpoint_every == 0 or step >= end or preempt:
          lost = getattr(lock, "lost", None)  # a bucket workdir's lease taken over by another run
          if _agree(lost is not None):
            raise workdir_lock.WorkdirBusy(
              f"workdir {workdir}: another training run took it over ({lost or 'see process 0'}); "
              f"stopped before writing step {step}, nothing of it written"
            )
          ckpt.save(step, train_lib.checkpoint_items(state))
        if preempt:
          preempted = True
          _log(f"preemption signal: checkpoint at step {step} written, exiting")
          break
    except Exception as e:
      watchdog.on_error(e)  # a lost peer is reported as such, not as the collective that noticed
      raise
    finally:
      _close_all(ckpt.close, watchdog.stop, writer.close)
      if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)
    elapsed = time.time() - t_start
    done = step - step_at_start
    return {
      "step": step,
      "steps": done,
      "seconds": elapsed,
      "steps_per_sec": done / max(elapsed, 1e-9),
      "images_per_sec": done * loop.global_batch_size / max(elapsed, 1e-9),
      "preempted": preempted,
      "skipped": int(jax.device_get(state.skipped)),
      "params": n_params,
      "state": state,
    }
  finally:
    if lock is not None:
      lock.release()


def train_function(
  mesh,
  shardings,
  graphdef,
  *,
  tx,
  optim: train_lib.OptimizerSpec,
  loss,
  loop: LoopSpec,
  sched=None,
  num_classes: int | None = None,
  use_dropout: bool = False,
):
  """The jitted train function `run` uses (`ddx.training.step.make_train_fn` of the objective
  ``loss`` selects), for ``mesh`` and the state's ``shardings`` (None: replicated)."""
  common = dict(
    shardings=shardings,
    param_shardings=None if shardings is None else shardings.params,
    graphdef=graphdef,
    tx=tx,
    lr_fn=train_lib.learning_rate_fn(optim),
    loss=loss,
    ema_decay=loop.ema_decay,
    ema_warmup=loop.ema_warmup,
  )
  if isinstance(loss, autoencoder_train.AutoencoderLossSpec):
    return train_lib.make_train_fn(mesh, loop.steps_per_call, step_fn=autoencoder_train.train_step, **common)
  return train_lib.make_train_fn(
    mesh,
    loop.steps_per_call,
    sched=sched,
    num_classes=num_classes,
    label_dropout=loop.label_dropout,
    use_dropout=use_dropout,
    grad_accum=loop.grad_accum,
    **common,
  )


def plan(
  model_factory: Callable[[nnx.Rngs], nnx.Module],
  *,
  image_shape: tuple[int, int, int],
  optim: train_lib.OptimizerSpec,
  loss,
  loop: LoopSpec,
  sched=None,
  num_classes: int | None = None,
  use_dropout: bool = False,
  mesh=None,
  train_fn=None,
  batch_extra: dict | None = None,
) -> tuple[report.StateBytes, report.CompiledStats]:
  """What `run` would report at its start, without training and without allocating anything:
  the per-device state bytes and XLA's analysis of the train function compiled for abstract
  inputs on ``mesh`` (default: ``make_mesh(loop.fsdp)`` over the devices at hand, which may be
  fake CPU devices). ``train_fn(mesh, shardings or None, graphdef, tx)`` replaces `train_function` for
  another step, whose batch also holds ``batch_extra`` (name -> (per-example shape, dtype));
  benchmarks/scale.py plans a text-conditional step that way."""
  mesh = mesh if mesh is not None else parallel.make_mesh(loop.fsdp)
  parallel.check_batch(loop.global_batch_size, mesh, "train.global_batch_size")
  tx = train_lib.make_optimizer(optim)
  base = jax.random.key(loop.seed)  # the run's keys, as `run` derives them
  graphdef, abstract = train_lib.abstract_state(
    model_factory, tx, jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)
  )
  shardings = train_lib.state_shardings(abstract, mesh, tx, loop.sharding_rules)
  given = shardings if dict(mesh.shape).get(parallel.FSDP, 1) > 1 else None  # as `run` does
  if train_fn is not None:
    fn = train_fn(mesh, given, graphdef, tx)
  else:
    fn = train_function(
      mesh,
      given,
      graphdef,
      tx=tx,
      optim=optim,
      loss=loss,
      loop=loop,
      sched=sched,
      num_classes=num_classes,
      use_dropout=use_dropout,
    )
  state_in = jax.tree_util.tree_map(
    lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract, shardings
  )
  K, B = loop.steps_per_call, loop.global_batch_size
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.batch_axes(mesh)))
  batch = {
    "image": jax.ShapeDtypeStruct((K, B, *image_shape), np.float32, sharding=batch_sh),
    "label": jax.ShapeDtypeStruct((K, B), np.int32, sharding=batch_sh),
  }
  for name, (shape, dtype) in (batch_extra or {}).items():
    batch[name] = jax.ShapeDtypeStruct((K, B, *shape), dtype, sharding=batch_sh)
  compiled = fn.lower(state_in, batch).compile()
  return report.state_bytes(abstract, shardings), report.compiled_stats(compiled)


def _resume(ckpt: checkpoint.Checkpointer, template, workdir: str):
  """Restore the newest checkpoint that verifies: ``(step, state)``, or ``(None, template)``
  for a fresh run.

  Newer steps that fail (unreadable, or a leaf that differs from its checksum) are moved to
  ``<workdir>/checkpoints_corrupt/`` (kept, never deleted) once an older step has verified:
  the run will save those step numbers again, and orbax's max_to_keep garbage collection
  would otherwise count them and delete good steps. If no step verifies, nothing is moved
  (the cause may be a changed config rather than damage) and the run stops.
  """
  bad = []
  # the processes' first collective follows; they may arrive far apart (see parallel.barrier)
  parallel.barrier("resume")
  for step in reversed(ckpt.all_steps()):
    error = None
    try:
      items = ckpt.restore(step, train_lib.checkpoint_targets(template))
      state = train_lib.state_from_checkpoint(template, items, step)
    except ValueError as e:  # CorruptCheckpointError, or a train record that disagrees
      error = e
    # Every process resumes from the same step: one that any process cannot verify (a
    # host-local read error, say) is bad for all of them.
    if _agree(error is not None):
      if error is not None and jax.process_index() > 0:
        print(f"process {jax.process_index()}: checkpoint step {step} does not verify: {error}", flush=True)
      _log(
        f"checkpoint step {step} does not verify: {error}"
        if error is not None
        else f"checkpoint step {step} does not verify on every process (see the other processes' output)"
      )
      bad.append(step)
      continue
    moved = []
    if bad:
      if jax.process_index() == 0:
        moved = [checkpoint.set_aside(workdir, b) for b in bad]
      parallel.barrier("set_aside")
      ckpt.reload()
    where = f"{checkpoint.checkpoint_dir(workdir)}/{step}"
    if bad:
      _log(
        f"resumed from {where}, the newest checkpoint that verifies (step {', '.join(map(str, bad))} failed "
        f"verification; moved to {', '.join(moved)}, not deleted)"
      )
    else:
      _log(f"resumed from {where}")
    return step, state
  if bad:
    raise checkpoint.CorruptCheckpointError(
      f"no checkpoint in {checkpoint.checkpoint_dir(workdir)} verifies (steps {', '.join(map(str, bad))}; see "
      "`python -m ddx verify`); move them away to start over",
      bad[0],
    )
  return None, template


def _close_all(*closers: Callable[[], None]) -> None:
  """Run every closer. While an exception is already on its way out (called from a
  ``finally``), their errors are dropped: on a full disk the checkpoint's error is the one to
  report, not the log file's that follows it. Otherwise the first error is raised, after all
  have run."""
  in_flight = sys.exc_info()[1] is not None
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001 -- re-raised below unless another error is being reported
      first = first or e
  if first is not None and not in_flight:
    raise first


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def _agree(flag: bool) -> bool:
  """``flag`` or-ed over all processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _write_samples(
  sample_fn, state, step, workdir, writer, spec: SampleSpec, num_classes, base, image_shape, decode=None
) -> None:
  # every process takes part in the (sharded) sampling; process 0 writes the files
  labels = guidance.default_labels(spec.num, num_classes, None)
  shape = (spec.num,) + tuple(int(d) for d in image_shape)
  x = parallel.to_host(
    sample_fn(state.ema_params, jax.random.fold_in(jax.random.fold_in(base, 2), step), shape, labels)
  )
  if decode is not None and np.all(np.isfinite(x)):
    x = decode(x)
  if jax.process_index() == 0:
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
      _log(
        f"warning: sample grid at step {step}: {bad} of {np.size(x)} values are not finite; nothing written, "
        "training goes on"
      )
      return
    png, _ = images.save_samples(os.path.join(workdir, "samples", f"step_{step:08d}"), x, labels, scale=2)
    writer.image(step, "samples", images.make_grid(images.to_uint8(x)))
    _log(f"samples: {png}")


def _evaluate(eval_fn, state, step, writer, spec: EvalSpec, num_classes, base, image_shape) -> None:
  t0 = time.time()
  try:
    m = quality.measure(
      eval_fn,
      state.ema_params,
      image_shape=tuple(int(d) for d in image_shape),
      num=spec.num,
      batch=spec.batch,
      key=jax.random.fold_in(jax.random.fold_in(base, 3), step),
      net=spec.net,
      reference=spec.reference,
      num_classes=num_classes,
    )
  except quality.NonFiniteSamples as e:
    _log(f"eval at step {step}: skipped, {e}")  # training goes on; the checkpoint decides
    return
  writer.scalars(step, {f"eval/{k}": m[k] for k in EVAL_METRICS if k in m})
  pr = f"  precision {m['precision']:.3f}  recall {m['recall']:.3f}" if "precision" in m else ""
  _log(
    f"eval at step {step}: {spec.sampler} S={spec.steps} N={spec.num} [{spec.net.name}]  FD {m['fd']:.4g}  "
    f"KID {m['kid_mean']:.4g} ± {m['kid_std']:.2g}{pr}  ({time.time() - t0:.0f} s)"
  )
