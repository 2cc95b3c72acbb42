"""Workdir layout and orbax checkpoints of pytrees (no knowledge of models or train states:
callers hand in pure pytrees and abstract targets).

Layout of a workdir::

    <workdir>/config.json              the run config (JSON). Required sections:
        "model":     the model's constructor kwargs (normalised by the caller)
        "diffusion": {"num_timesteps", "beta_schedule", "beta_start", "beta_end",
                      "prediction": "eps"|"x0"|"v",
                      "variance": "fixed_small"|"fixed_large"|"learned_range", ...}
      other sections (training, data, ...) are free-form.
    <workdir>/checkpoints/<step>/      one orbax CheckpointManager step, Composite items:
        "params"      pure dict of the model's nnx.Param values (``nnx.to_pure_dict(state)``)
        "ema_params"  same structure (EMA weights; used for sampling)
        "opt_state"   optional, any pytree (optax state)           -- StandardSave
        "train"       optional, JSON dict (e.g. {"step": 10, "key": [..uint32 key data..]})
                                                                    -- JsonSave

``save`` writes both; ``restore`` reads them back. Errors about a
missing or broken workdir / checkpoint are one line naming the path: FileNotFoundError for
missing paths, ValueError for invalid or corrupt content.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

CONFIG_NAME = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
JSON_ITEMS = ("train",)  # items saved with JsonSave; everything else uses StandardSave
PARAM_ITEMS = ("params", "ema_params")


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


def _to_jsonable(obj: Any, where: str) -> Any:
  if isinstance(obj, Mapping):
    return {str(k): _to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  raise ValueError(f"{where}: value of type {type(obj).__name__} is not JSON-serialisable")


# ---------------------------------------------------------------- config.json


def write_config(workdir: str | os.PathLike, config: Mapping[str, Any]) -> dict:
  """Validate and (atomically) write ``<workdir>/config.json``; returns what was written.

  If a config.json already exists, its ``"model"`` section must be identical (a workdir holds
  one architecture); the other sections are replaced.
  """
  if not isinstance(config, Mapping):
    raise ValueError(f"config: must be a mapping, got {type(config).__name__}")
  for section in ("model", "diffusion"):
    if not isinstance(config.get(section), Mapping):
      raise ValueError(f"config: missing the {section!r} section")
  cfg = _to_jsonable(dict(config), "config")
  workdir = os.path.abspath(os.fspath(workdir))
  fname = os.path.join(workdir, CONFIG_NAME)
  if os.path.isfile(fname):
    old = read_config(workdir)
    if old.get("model") != cfg["model"]:
      raise ValueError(f"{fname}: holds a different model config; use a fresh workdir")
  os.makedirs(workdir, exist_ok=True)
  tmp = fname + ".tmp"
  with open(tmp, "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, fname)
  return cfg


def read_config(workdir: str | os.PathLike) -> dict:
  """Read ``<workdir>/config.json`` (FileNotFoundError / ValueError naming the path)."""
  workdir = os.path.abspath(os.fspath(workdir))
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir does not exist: {workdir}")
  fname = os.path.join(workdir, CONFIG_NAME)
  if not os.path.isfile(fname):
    raise FileNotFoundError(f"no {CONFIG_NAME} in workdir {workdir}")
  try:
    with open(fname) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{fname}: invalid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
    raise ValueError(f"{fname}: missing the 'model' section")
  return cfg


# ---------------------------------------------------------------- checkpoints


def _manager(workdir, *, read_only: bool, max_to_keep: int | None = None):
  # (orbax's own read_only mode only adds warnings; we simply never save when reading)
  opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts)


def _pure(item: Any) -> Any:
  """nnx.Module -> pure dict of its Params; nnx.State -> pure dict; anything else as is."""
  if isinstance(item, nnx.Module):
    return nnx.to_pure_dict(nnx.state(item, nnx.Param))
  if isinstance(item, nnx.State):
    return nnx.to_pure_dict(item)
  return item


def save(workdir: str | os.PathLike, step: int, items: Mapping[str, Any],
         config: Mapping[str, Any] | None = None, *, max_to_keep: int | None = None) -> str:
  """Save one checkpoint step (blocking until it is committed); returns its directory.

  Args:
    workdir: the run directory (created if needed).
    step: the training step (int >= 0).
    items: name -> value. "params" / "ema_params": an nnx.Module, an nnx.State of Params or
      its pure dict; "opt_state": any pytree; "train": a JSON-able dict.
    config: the run config, written to ``<workdir>/config.json`` when given (required
      if the workdir has no config.json yet).
    max_to_keep: keep only the newest checkpoints (None keeps all).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  if config is not None:
    write_config(workdir, config)
  elif not os.path.isfile(os.path.join(workdir, CONFIG_NAME)):
    raise ValueError(f"config: required, {workdir} has no {CONFIG_NAME} yet")
  if not items:
    raise ValueError("items: nothing to save")
  args = {}
  for name, value in items.items():
    if name in JSON_ITEMS:
      args[name] = ocp.args.JsonSave(_to_jsonable(value, name))
    else:
      args[name] = ocp.args.StandardSave(_pure(value))
  mngr = _manager(workdir, read_only=False, max_to_keep=max_to_keep)
  try:
    mngr.save(int(step), args=ocp.args.Composite(**args), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return os.path.join(checkpoint_dir(workdir), str(int(step)))


def all_steps(workdir: str | os.PathLike) -> list[int]:
  """Committed checkpoint steps in the workdir (sorted; [] if none)."""
  cdir = checkpoint_dir(workdir)
  if not os.path.isdir(cdir):
    return []
  mngr = _manager(workdir, read_only=True)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def latest_step(workdir: str | os.PathLike) -> int | None:
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def resolve_step(workdir: str | os.PathLike, step: int | None = None) -> int:
  """The checkpoint step to read (default: the latest); FileNotFoundError naming the path if none."""
  workdir = os.path.abspath(os.fspath(workdir))
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir does not exist: {workdir}")
  cdir = checkpoint_dir(workdir)
  steps = all_steps(workdir)
  if not steps:
    partial = sorted(os.listdir(cdir)) if os.path.isdir(cdir) else []
    extra = f" (only incomplete entries: {', '.join(partial)})" if partial else ""
    raise FileNotFoundError(f"no checkpoint in {cdir}{extra}")
  if step is None:
    return steps[-1]
  if int(step) not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {cdir} (steps: {steps})")
  return int(step)


def restore(workdir: str | os.PathLike, step: int | None = None,
            targets: Mapping[str, Any] | None = None) -> tuple[int, dict]:
  """Restore checkpoint items.

  Args:
    workdir: the run directory.
    step: the step to restore (default: the latest).
    targets: item name -> target pytree (abstract ``jax.ShapeDtypeStruct`` leaves are fine)
      or None (restore as saved, onto this process's first device, whatever topology wrote
      it; dict keys come back as strings). Default: ``{"params": None, "ema_params": None}``.

  Returns:
    ``(step, {name: value})``.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  step = resolve_step(workdir, step)
  sdir = os.path.join(checkpoint_dir(workdir), str(step))
  targets = dict(targets) if targets is not None else {n: None for n in PARAM_ITEMS}
  for name in targets:
    if not os.path.isdir(os.path.join(sdir, name)):
      raise ValueError(f"checkpoint {sdir} has no item {name!r}")
  args = {}
  mngr = _manager(workdir, read_only=True)
  try:
    for name, target in targets.items():
      if name in JSON_ITEMS:
        args[name] = ocp.args.JsonRestore()
      else:
        if target is None:
          target = _abstract_from_metadata(sdir, name)
        args[name] = ocp.args.StandardRestore(_with_local_sharding(_pure(target)))
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax / tensorstore raise many types for broken files
    raise ValueError(f"corrupt or incomplete checkpoint {sdir}: {_error_line(e)}") from e
  finally:
    mngr.close()
  return step, {name: out[name] for name in targets}


def _with_local_sharding(target):
  """Abstract leaves without a sharding restore onto this process's first device (orbax
  would otherwise insist on the topology that wrote the checkpoint)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fix(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
    return leaf

  return jax.tree_util.tree_map(fix, target)


def _abstract_from_metadata(step_dir: str, name: str):
  """Abstract single-device target for an item, from its saved metadata: restoring without a
  target fails when the checkpoint was written by another topology (e.g. a multi-host run)."""
  from etils import epath  # pylint: disable=import-outside-toplevel  (an orbax dependency)
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(step_dir, name)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)


# ---------------------------------------------------------------- training checkpoints


def _error_line(e: Exception) -> str:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return msg[:300]


def all_finite(tree) -> bool:
  """True if every floating leaf of ``tree`` is finite (checked before a save)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  leaves = [jnp.all(jnp.isfinite(l)) for l in jax.tree_util.tree_leaves(_pure(tree))
            if jnp.issubdtype(jnp.asarray(l).dtype, jnp.inexact)]
  return bool(jax.device_get(jnp.all(jnp.stack(leaves)))) if leaves else True


class Checkpointer:
  """A run's long-lived, asynchronous checkpoint manager (same layout as `save`).

  Keeps the newest ``max_to_keep`` steps plus every step that is a multiple of
  ``keep_period``. Saves are asynchronous: device arrays are copied to host memory before
  ``save`` returns (so donating them afterwards is safe) and written in the background;
  orbax commits a step atomically (temporary directory + rename), so a run killed mid-write
  resumes from the previous complete step.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int, keep_period: int = 0):
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
        enable_async_checkpointing=True)
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.mngr = ocp.CheckpointManager(checkpoint_dir(self.workdir), options=opts)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def reached_preemption(self, step: int) -> bool:
    return bool(self.mngr.reached_preemption(int(step)))

  def save(self, step: int, items: Mapping[str, Any]) -> None:
    """Start saving ``items`` (name -> pytree, or a JSON dict for `JSON_ITEMS`) at ``step``.

    Refuses (ValueError) to write non-finite floating values: a checkpoint never holds NaN.
    """
    step = int(step)
    arrays = {n: v for n, v in items.items() if n not in JSON_ITEMS}
    if not all_finite(arrays):
      raise ValueError(f"state: non-finite values at step {step}; refusing to write a checkpoint")
    args = {n: (ocp.args.JsonSave(_to_jsonable(v, n)) if n in JSON_ITEMS else ocp.args.StandardSave(_pure(v)))
            for n, v in items.items()}
    self.mngr.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, targets: Mapping[str, Any]) -> dict:
    """Restore items shaped (and sharded) like ``targets`` (name -> pytree; None for JSON items)."""
    step = int(step)
    sdir = os.path.join(checkpoint_dir(self.workdir), str(step))
    args = {n: (ocp.args.JsonRestore() if n in JSON_ITEMS else ocp.args.StandardRestore(_pure(t)))
            for n, t in targets.items()}
    try:
      out = self.mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax / tensorstore raise many types for broken files
      raise ValueError(f"corrupt or incomplete checkpoint {sdir}: {_error_line(e)}") from e
    return {n: out[n] for n in targets}

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()
