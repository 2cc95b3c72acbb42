"""Workdir layout and orbax checkpoints of pytrees (no knowledge of models or train states:
callers hand in pure pytrees and abstract targets).

Layout of a workdir::

    <workdir>/config.json              the run config (JSON). Required sections:
        "model":     the model's constructor kwargs (normalised by the caller)
        "diffusion": {"num_timesteps", "beta_schedule", "beta_start", "beta_end",
                      "prediction": "eps"|"x0"|"v",
                      "variance": "fixed_small"|"fixed_large"|"learned_range", ...}
        "kind":      optional, "diffusion" (the default) or "autoencoder": what "model" and the
                     checkpoints describe (`KINDS`)
        "latent":    optional; a latent diffusion model's {"autoencoder_workdir",
                     "autoencoder_step", "scaling_factor"}: samples are decoded by that autoencoder
      other sections (training, data, ...) are free-form.
    <workdir>/checkpoints/<step>/      one orbax CheckpointManager step, Composite items:
        "params"      pure dict of the model's nnx.Param values (``nnx.to_pure_dict(state)``)
        "ema_params"  same structure (EMA weights; used for sampling)
        "opt_state"   optional, any pytree (optax state)           -- StandardSave
        "train"       optional, JSON dict (e.g. {"step": 10, "key": [..uint32 key data..]})
                                                                    -- JsonSave
        "checksums"   written by ddx with every step, JSON: {"algorithm": "sha256",
                      "leaves": {"<item>/<key>/<key>...": {"dtype", "shape", "sha256"}}}, one
                      entry per array leaf (the bytes of its host copy, C order, little-endian)
                      and one per JSON item (its canonical JSON text)  -- JsonSave

``save`` and `Checkpointer.save` write the checksums; ``restore`` and `Checkpointer.restore`
check every leaf they read against them and raise `CorruptCheckpointError` (one line naming
the step and the first bad leaf). Steps written before checksums existed still load, with a
one-line warning (logger ``ddx.training.checkpoint``). `verify` checks a whole step. Errors about a
missing or broken workdir / checkpoint are one line naming the path: FileNotFoundError for
missing paths, ValueError for invalid or corrupt content.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ddx import parallel, storage

CONFIG_NAME = "config.json"
KINDS = ("diffusion", "autoencoder")  # config.json "kind": what a workdir's checkpoints hold
CHECKPOINT_SUBDIR = "checkpoints"
JSON_ITEMS = ("train",)  # items saved with JsonSave; everything else uses StandardSave
PARAM_ITEMS = ("params", "ema_params")
CHECKSUMS_ITEM = "checksums"
CORRUPT_SUBDIR = "checkpoints_corrupt"  # where `set_aside` moves steps that failed verification
# orbax commits a step on an object store (no rename there) by writing this file into it last
_COMMIT_MARKER = "commit_success.txt"
_LOG = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
  """A committed checkpoint step that cannot be read, or whose data differ from its checksums."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class CheckpointWriteError(ValueError):
  """A checkpoint step could not be written (a full disk, say); the earlier steps are intact
  and the unfinished one is not counted as a step (orbax commits by renaming a temporary
  directory, which never happened)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """``<workdir>/checkpoints``; ValueError for a workdir where orbax cannot write checkpoints."""
  workdir = storage.normalize(workdir, "workdir")
  if storage.scheme(workdir) == "s3":
    # orbax 0.12 gives tensorstore a local-file spec for an s3:// directory (and would commit
    # steps by renaming, which S3 cannot do atomically): refused here, before any work
    raise ValueError(
      f"workdir: {workdir}: checkpoints cannot be written to s3:// yet (orbax writes arrays to local "
      "paths and gs:// only); use a gs:// bucket or a shared filesystem"
    )
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


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
  workdir = storage.normalize(workdir, "workdir")
  fname = os.path.join(workdir, CONFIG_NAME)
  if storage.isfile(fname):
    old = read_config(workdir)
    if old.get("model") != cfg["model"]:
      raise ValueError(f"{fname}: holds a different model config; use a fresh workdir")
  storage.write_text(fname, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
  return cfg


def read_config(workdir: str | os.PathLike) -> dict:
  """Read ``<workdir>/config.json`` (FileNotFoundError / ValueError naming the path)."""
  workdir = storage.normalize(workdir, "workdir")
  fname = os.path.join(workdir, CONFIG_NAME)
  if not storage.isfile(fname):
    if not storage.isdir(workdir):
      raise FileNotFoundError(f"workdir does not exist: {workdir}")
    raise FileNotFoundError(f"no {CONFIG_NAME} in workdir {workdir}")
  try:
    cfg = json.loads(storage.read_text(fname))
  except json.JSONDecodeError as e:
    raise ValueError(f"{fname}: invalid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
    raise ValueError(f"{fname}: missing the 'model' section")
  return cfg


def read_trained_config(workdir: str, kind: str, name: str = "workdir") -> dict:
  """``config.json`` of a workdir that holds a trained model of ``kind`` (one of `KINDS`) with
  at least one checkpoint; otherwise a one-line ValueError starting with ``name``."""
  if not isinstance(workdir, str) or not workdir.strip():
    raise ValueError(
      f"{name}: must be the path of a{'n' if kind[0] in 'aeiou' else ''} {kind} workdir, got {workdir!r}"
    )
  try:
    config = read_config(workdir)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"{name}: {e}") from None
  got = config.get("kind", "diffusion")
  if got != kind:
    raise ValueError(
      f"{name}: {workdir} holds a {got} model, not a{'n' if kind[0] in 'aeiou' else ''} {kind} (its config.json kind)"
    )
  if latest_step(workdir) is None:
    raise ValueError(f"{name}: no checkpoint in {checkpoint_dir(workdir)}")
  return config


# ---------------------------------------------------------------- checkpoints


def _manager(workdir, *, read_only: bool, max_to_keep: int | None = None):
  # (orbax's own read_only mode only adds warnings; we simply never save when reading)
  opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only)
  return ocp.CheckpointManager(storage.path(checkpoint_dir(workdir)), options=opts)


def _pure(item: Any) -> Any:
  """nnx.Module -> pure dict of its Params; nnx.State -> pure dict; anything else as is."""
  if isinstance(item, nnx.Module):
    return nnx.to_pure_dict(nnx.state(item, nnx.Param))
  if isinstance(item, nnx.State):
    return nnx.to_pure_dict(item)
  return item


def save(
  workdir: str | os.PathLike,
  step: int,
  items: Mapping[str, Any],
  config: Mapping[str, Any] | None = None,
  *,
  max_to_keep: int | None = None,
) -> str:
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
  workdir = storage.normalize(workdir, "workdir")
  if config is not None:
    write_config(workdir, config)
  elif not storage.isfile(os.path.join(workdir, CONFIG_NAME)):
    raise ValueError(f"config: required, {workdir} has no {CONFIG_NAME} yet")
  args = _save_args(items)
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
  if not storage.isdir(cdir):
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
  workdir = storage.normalize(workdir, "workdir")
  cdir = checkpoint_dir(workdir)
  steps = all_steps(workdir)
  if not steps and not storage.isdir(workdir):
    raise FileNotFoundError(f"workdir does not exist: {workdir}")
  if not steps:
    partial = storage.listdir(cdir)
    extra = f" (only incomplete entries: {', '.join(partial)})" if partial else ""
    raise FileNotFoundError(f"no checkpoint in {cdir}{extra}")
  if step is None:
    return steps[-1]
  if int(step) not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {cdir} (steps: {steps})")
  return int(step)


def restore(
  workdir: str | os.PathLike, step: int | None = None, targets: Mapping[str, Any] | None = None
) -> tuple[int, dict]:
  """Restore checkpoint items.

  Args:
    workdir: the run directory.
    step: the step to restore (default: the latest).
    targets: item name -> target pytree (abstract ``jax.ShapeDtypeStruct`` leaves are fine)
      or None (restore as saved, onto this process's first device, whatever topology wrote
      it; dict keys come back as strings). Default: ``{"params": None, "ema_params": None}``.

  Returns:
    ``(step, {name: value})``.

  Raises:
    CorruptCheckpointError: the step cannot be read or a leaf differs from its checksum (one
      line naming the step and the first bad leaf). A step without checksums (written before
      ddx recorded them) loads with a one-line warning.
  """
  step, items, _ = _restore_checked(workdir, step, targets)
  return step, items


def _restore_checked(workdir, step, targets, warn: bool = True) -> tuple[int, dict, int | None]:
  """`restore`, also returning how many leaves were verified (None: the step has no checksums;
  a one-line warning is logged if ``warn``)."""
  workdir = storage.normalize(workdir, "workdir")
  step = resolve_step(workdir, step)
  sdir = os.path.join(checkpoint_dir(workdir), str(step))
  targets = dict(targets) if targets is not None else {n: None for n in PARAM_ITEMS}
  for name in targets:
    if name == CHECKSUMS_ITEM:
      raise ValueError(f"targets: {CHECKSUMS_ITEM!r} is read and checked by restore itself")
    if not storage.isdir(os.path.join(sdir, name)):
      raise ValueError(f"checkpoint {sdir} has no item {name!r}")
  # a target of None restores the item as saved onto this process (whatever topology wrote it)
  try:
    targets = {
      n: (_abstract_from_metadata(sdir, n) if t is None and n not in JSON_ITEMS else t) for n, t in targets.items()
    }
  except Exception as e:  # orbax / tensorstore raise many types for broken metadata
    raise CorruptCheckpointError(f"corrupt or incomplete checkpoint {sdir}: {_read_error(e, step)}", step) from e
  targets = {n: (t if n in JSON_ITEMS else _with_local_sharding(_pure(t))) for n, t in targets.items()}
  mngr = _manager(workdir, read_only=True)
  try:
    items, n = _restore_verified(mngr, sdir, step, targets, warn=warn)
  finally:
    mngr.close()
  return step, items, n


def _restore_verified(
  mngr: ocp.CheckpointManager, step_dir: str, step: int, targets: Mapping[str, Any], *, warn: bool = True
) -> tuple[dict, int | None]:
  """The one restore path (`restore`, `verify` and `Checkpointer.restore`): read ``targets``
  (name -> pytree shaped and sharded as wanted; None for JSON items) and the step's checksums
  with ``mngr``, and check every leaf. Returns ``(items, leaves verified or None)``."""
  has_sums = _has_checksums(step_dir, step)
  args = {
    n: (ocp.args.JsonRestore() if n in JSON_ITEMS else ocp.args.StandardRestore(_pure(t))) for n, t in targets.items()
  }
  if has_sums:
    args[CHECKSUMS_ITEM] = ocp.args.JsonRestore()
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax / tensorstore raise many types for broken files
    raise CorruptCheckpointError(f"corrupt or incomplete checkpoint {step_dir}: {_read_error(e, step)}", step) from e
  items = {n: out[n] for n in targets}
  n = check_items(items, out[CHECKSUMS_ITEM] if has_sums else None, step=step, step_dir=step_dir, warn=warn)
  return items, n


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
  meta = ocp.StandardCheckpointHandler().metadata(storage.path(os.path.join(step_dir, name)))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)


# ---------------------------------------------------------------- integrity


def _save_args(items: Mapping[str, Any]) -> dict:
  """orbax Composite args for ``items`` plus their checksums."""
  if not items:
    raise ValueError("items: nothing to save")
  if CHECKSUMS_ITEM in items:
    raise ValueError(f"items: {CHECKSUMS_ITEM!r} is reserved (ddx writes it with every step)")
  pure = {n: (_to_jsonable(v, n) if n in JSON_ITEMS else _pure(v)) for n, v in items.items()}
  args = {n: (ocp.args.JsonSave(v) if n in JSON_ITEMS else ocp.args.StandardSave(v)) for n, v in pure.items()}
  args[CHECKSUMS_ITEM] = ocp.args.JsonSave(checksums(pure))
  return args


def _key_name(k) -> str:
  # one spelling whatever the container: a dict key, a list index or a namedtuple field (orbax
  # hands back namedtuples as dicts and int dict keys as strings when restoring as saved)
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_paths(items: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """``[("<item>/<key>/...", leaf)]`` for the array items of ``items`` (JSON items: one entry
  holding the whole value), sorted by path."""
  out = []
  for name, value in items.items():
    if name in JSON_ITEMS:
      out.append((name, value))
      continue
    flat, _ = jax.tree_util.tree_flatten_with_path(_pure(value))
    out.extend(("/".join([name, *(_key_name(k) for k in path)]), leaf) for path, leaf in flat)
  return sorted(out, key=lambda kv: kv[0])


def _digest(path: str, leaf) -> dict:
  if path.split("/", 1)[0] in JSON_ITEMS:
    text = json.dumps(_to_jsonable(leaf, path), sort_keys=True, separators=(",", ":"))
    return {"sha256": hashlib.sha256(text.encode()).hexdigest()}
  a = np.ascontiguousarray(parallel.to_host(leaf))
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  # reshape + view: works for every dtype, including ml_dtypes' bfloat16 (no buffer format code)
  return {
    "dtype": a.dtype.name,
    "shape": list(a.shape),
    "sha256": hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest(),
  }


def _digests(named: list[tuple[str, Any]]) -> dict[str, dict]:
  # hashlib releases the GIL on large buffers: hash leaves of 1 MiB and more on all cores; small
  # ones in this thread (per-leaf overhead, ~40 us, would dominate in a pool)
  big = [kv for kv in named if (getattr(kv[1], "nbytes", 0) or 0) >= 1 << 20]
  out = {}
  workers = min(8, os.cpu_count() or 1, len(big))
  if workers > 1:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      out.update(zip([p for p, _ in big], pool.map(lambda kv: _digest(*kv), big)))
  for path, leaf in named:
    if path not in out:
      out[path] = _digest(path, leaf)
  return out


def checksums(items: Mapping[str, Any]) -> dict:
  """The ``checksums`` record of checkpoint items (what `save` writes with every step)."""
  return {"algorithm": "sha256", "leaves": _digests(leaf_paths(items))}


def check_items(
  items: Mapping[str, Any], record: Mapping | None, *, step: int, step_dir: str, warn: bool = True
) -> int | None:
  """Check restored ``items`` against a step's checksums ``record``; the number of leaves
  checked, or None (with a one-line warning) if the step has no checksums.

  Raises:
    CorruptCheckpointError: naming the step and the first bad leaf (sorted by path).
  """
  if record is None:
    if warn:
      _LOG.warning(
        "checkpoint %s (step %d) has no checksums (written before ddx recorded them): loaded unverified", step_dir, step
      )
    return None

  def bad(leaf, what):
    return CorruptCheckpointError(f"corrupt checkpoint {step_dir}: step {step}: {leaf} {what}", step)

  leaves = record.get("leaves") if isinstance(record, Mapping) else None
  if not isinstance(leaves, Mapping) or record.get("algorithm") != "sha256":
    raise bad(CHECKSUMS_ITEM, "is not a ddx checksums record")
  named = leaf_paths(items)
  got = _digests(named)
  for path in sorted(set(got) | {p for p in leaves if p.split("/", 1)[0] in items}):
    if path not in leaves:
      raise bad(path, "has no recorded checksum")
    if path not in got:
      raise bad(path, "is recorded in the checksums but was not restored")
    want, have = leaves[path], got[path]
    if "dtype" in want and (want["dtype"], list(want["shape"])) != (have["dtype"], have["shape"]):
      raise bad(path, f"was saved as {want['dtype']}{list(want['shape'])}, restored as {have['dtype']}{have['shape']}")
    if want["sha256"] != have["sha256"]:
      raise bad(path, "does not match its sha256 checksum (its bytes changed after the step was written)")
  return len(named)


def _has_checksums(step_dir: str, step: int) -> bool:
  """Whether the step has a checksums item (CorruptCheckpointError if its metadata lists one
  that is gone)."""
  if storage.isdir(os.path.join(step_dir, CHECKSUMS_ITEM)):
    return True
  try:
    meta = json.loads(storage.read_text(os.path.join(step_dir, "_CHECKPOINT_METADATA")))
    listed = CHECKSUMS_ITEM in meta.get("item_handlers", {})
  except (OSError, ValueError, AttributeError):
    listed = False
  if listed:
    raise CorruptCheckpointError(
      f"corrupt checkpoint {step_dir}: step {step}: its {CHECKSUMS_ITEM} item is missing", step
    )
  return False


def verify(workdir: str | os.PathLike, step: int) -> tuple[str, str]:
  """Read every item of one step and check it: ``(status, detail)`` with status "ok", "bad"
  (detail: the one-line error) or "unverified" (no checksums; the step is readable)."""
  workdir = storage.normalize(workdir, "workdir")
  step = resolve_step(workdir, step)
  sdir = os.path.join(checkpoint_dir(workdir), str(step))
  names = [n for n in storage.listdir(sdir) if n != CHECKSUMS_ITEM and storage.isdir(os.path.join(sdir, n))]
  try:
    _, _, n = _restore_checked(workdir, step, {n: None for n in names}, warn=False)
  except ValueError as e:
    return "bad", str(e)
  if n is None:
    return "unverified", f"no checksums (written before ddx recorded them); items {', '.join(names)} are readable"
  return "ok", f"{n} leaves of {', '.join(names)} match their sha256 checksums"


def set_aside(workdir: str | os.PathLike, step: int) -> str:
  """Move a step that failed verification to ``<workdir>/checkpoints_corrupt/<step>`` (never
  deleted: kept for inspection, and out of the way of the next save of that step and of
  orbax's max_to_keep garbage collection). Returns the new path."""
  workdir = storage.normalize(workdir, "workdir")
  src = os.path.join(checkpoint_dir(workdir), str(int(step)))
  dst_root = os.path.join(workdir, CORRUPT_SUBDIR)
  dst, i = os.path.join(dst_root, str(int(step))), 1
  while storage.exists(dst):
    dst, i = os.path.join(dst_root, f"{int(step)}.{i}"), i + 1
  # on an object store the step's commit marker goes first: a move cut short leaves a step
  # orbax no longer lists, never a listed one with objects missing
  storage.move_tree(src, dst, first=(_COMMIT_MARKER,))
  return dst


# ---------------------------------------------------------------- training checkpoints


def _error_line(e: Exception) -> str:
  msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return msg[:300]


_OS_ERROR = re.compile(r"\[Errno \d+\] [^\]\[\n;]+")
# tensorstore: '... Failed to write 5999 bytes to file 35: File too large [os_error_code='27']'
_TS_OS_ERROR = re.compile(r":\s*([^:\[\n]+?)\s*\[os_error_code='(\d+)'\]")


def _write_reason(e: Exception) -> str:
  """The operating system's reason for a failed write (``[Errno 28] No space left on device``)
  from anywhere in the chain of ``e`` (tensorstore buries it at the end of a long message),
  else the first line of ``e``."""
  x, seen = e, 0
  while x is not None and seen < 10:
    text = str(x)
    m = _OS_ERROR.search(text)
    if m:
      return m.group(0).strip()
    m = _TS_OS_ERROR.search(text)
    if m:
      return f"[Errno {m.group(2)}] {m.group(1).strip()}"
    x, seen = x.__cause__ or x.__context__, seen + 1
  return _error_line(e)


# tensorstore: 'Error reading "<a.b.kernel>/0.0" in OCDBT database at local file "<step>/<item>/": <why>'
_TS_READ_ERROR = re.compile(r'Error reading "([^"]+?)/[^"/]*" in OCDBT database at [^"]*"([^"]+?)/?"\s*:\s*(.*)')


def _read_error(e: Exception, step: int) -> str:
  """One line for an orbax / tensorstore read failure, naming the leaf when tensorstore says
  which array it was reading."""
  seen, x = [], e
  while x is not None and len(seen) < 10:
    seen.append(x)
    x = x.__cause__ or x.__context__
  for x in reversed(seen):
    m = _TS_READ_ERROR.search(str(x))
    if m:
      leaf = "/".join([os.path.basename(m.group(2).rstrip("/")), *m.group(1).split(".")])
      return f"step {step}: {leaf} cannot be read: {m.group(3).strip().splitlines()[0][:200]}"
  return f"step {step}: {_error_line(e)}"


def all_finite(tree) -> bool:
  """True if every floating leaf of ``tree`` is finite (checked before a save)."""
  leaves = [l for l in jax.tree_util.tree_leaves(_pure(tree)) if jnp.issubdtype(jnp.asarray(l).dtype, jnp.inexact)]
  return bool(jax.device_get(_all_finite(leaves))) if leaves else True


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  # one program for the whole tree rather than one small one per leaf shape
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves]))


class Checkpointer:
  """A run's long-lived, asynchronous checkpoint manager (same layout as `save`).

  Keeps the newest ``max_to_keep`` steps plus every step that is a multiple of
  ``keep_period``. Saves are asynchronous: device arrays are copied to host memory before
  ``save`` returns (so donating them afterwards is safe) and written in the background;
  orbax commits a step atomically (temporary directory + rename), so a run killed mid-write
  resumes from the previous complete step.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int, keep_period: int = 0):
    self.workdir = storage.normalize(workdir, "workdir")
    opts = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_period or None,
      create=True,
      enable_async_checkpointing=True,
      # on an object store a step is written at its final name and committed by a marker
      # object: a run killed mid-save leaves an uncommitted step there, which would be
      # written into again; orbax deletes such steps when the run starts
      cleanup_tmp_directories=storage.is_remote(self.workdir),
    )
    self.mngr = ocp.CheckpointManager(storage.path(checkpoint_dir(self.workdir)), options=opts)
    self._pending: int | None = None  # the step being written in the background
    self._failed = False

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def reached_preemption(self, step: int) -> bool:
    return bool(self.mngr.reached_preemption(int(step)))

  def save(self, step: int, items: Mapping[str, Any]) -> None:
    """Start saving ``items`` (name -> pytree, or a JSON dict for `JSON_ITEMS`) at ``step``.

    Refuses (ValueError) to write non-finite floating values: a checkpoint never holds NaN.
    The checksums of every leaf are computed from host copies before this returns (the
    arrays may be donated afterwards) and written with the step. A write that fails, here or
    in the background (reported by the next `save` or `close`), raises
    `CheckpointWriteError` naming the step.
    """
    step = int(step)
    arrays = {n: v for n, v in items.items() if n not in JSON_ITEMS}
    if not all_finite(arrays):
      raise ValueError(f"state: non-finite values at step {step}; refusing to write a checkpoint")
    self.wait()  # the previous step's background write, and its error, first
    args = _save_args(items)
    self._pending = step
    try:
      self.mngr.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # orbax / tensorstore raise many types for a failed write
      raise self._write_error(e) from e

  def _write_error(self, e: Exception) -> CheckpointWriteError:
    step, self._pending, self._failed = self._pending, None, True
    try:
      last = max((s for s in self.mngr.all_steps() if s != step), default=None)
    except Exception:  # noqa: BLE001 -- only for the message
      last = None
    kept = f"the newest complete checkpoint, step {last}, is intact" if last is not None else "no earlier checkpoint"
    line = _write_reason(e)
    space = any(m in line for m in ("No space left", "File too large", "Disk quota"))
    return CheckpointWriteError(
      f"checkpoint step {step} could not be written to {checkpoint_dir(self.workdir)}: {line}; it does "
      f"not count as a step ({kept}). {'Free space and rerun' if space else 'Rerun'} the same command to resume.",
      step,
    )

  def restore(self, step: int, targets: Mapping[str, Any]) -> dict:
    """Restore items shaped (and sharded) like ``targets`` (name -> pytree; None for JSON items).

    Every leaf is checked against the step's checksums (`CorruptCheckpointError` names the step
    and the first bad leaf); a step without checksums loads with a one-line warning.
    """
    step = int(step)
    sdir = os.path.join(checkpoint_dir(self.workdir), str(step))
    return _restore_verified(self.mngr, sdir, step, targets)[0]

  def all_steps(self) -> list[int]:
    return sorted(self.mngr.all_steps())

  def reload(self) -> None:
    """Re-read the steps on disk (after `set_aside` moved one away)."""
    self.mngr.reload()

  def wait(self) -> None:
    """Until the background write is committed (`CheckpointWriteError` if it failed)."""
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # orbax re-raises the background write's error
      if self._failed:
        return  # already reported
      raise self._write_error(e) from e
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self.mngr.close()
      except Exception:  # noqa: BLE001 -- a failed write was reported by wait (or is being raised)
        if not self._failed:
          raise
