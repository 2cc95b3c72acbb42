"""Meshes, sharding rules and multi-host initialisation.

The training mesh has two axes, ``"data"`` and ``"fsdp"`` (`make_mesh`): the batch is split
over both; parameters, gradients, optimizer state and EMA are split over ``"fsdp"`` by one
small rule table (`ShardingRules`, `param_spec`): a leaf of at least ``min_size`` elements is
split along its largest dimension that the axis divides, anything else is replicated, and
per-path overrides come first. With ``fsdp = 1`` every leaf is replicated: plain data
parallelism. The same jitted program runs on one CPU, 8 fake CPU devices or a TPU pod; XLA
inserts the all-gathers and reduce-scatters the shardings imply.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax._src import distributed  # the coordinator it connected to, for device_report
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids=None,
) -> None:
  """Start multi-controller JAX when asked to, before any other JAX call.

  * explicit arguments, or ``DDX_COORDINATOR`` / ``DDX_NUM_PROCESSES`` / ``DDX_PROCESS_ID``
    (and optionally ``DDX_COORDINATOR_BIND``, the address process 0 listens on): used as
    given (the local launcher: 127.0.0.1:PORT);
  * a SLURM step with several tasks (launch/slurm_gpu.sbatch): ``jax.distributed`` reads the
    coordinator (first node of ``SLURM_STEP_NODELIST``), process count and index from the
    SLURM environment; the GPUs this task drives come from `slurm_local_device_ids`;
  * ``DDX_DISTRIBUTED=auto`` (TPU pods, launch/tpu_pod.sh): ``jax.distributed.initialize()``
    auto-detects everything;
  * otherwise a single process, left alone.
  """
  coordinator_address = coordinator_address or os.environ.get("DDX_COORDINATOR")
  if num_processes is None and "DDX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["DDX_NUM_PROCESSES"])
  if process_id is None and "DDX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["DDX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("num_processes: DDX_COORDINATOR is set, so DDX_NUM_PROCESSES and DDX_PROCESS_ID must be too")
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
      coordinator_bind_address=os.environ.get("DDX_COORDINATOR_BIND"),
    )
  elif in_slurm_step() and int(os.environ["SLURM_NTASKS"]) > 1:
    if local_device_ids is None:
      local_device_ids = slurm_local_device_ids(os.environ)
    jax.distributed.initialize(local_device_ids=local_device_ids)
  elif os.environ.get("DDX_DISTRIBUTED") == "auto":
    jax.distributed.initialize(local_device_ids=local_device_ids)


# What jax.distributed's SLURM detection needs (jax/_src/clusters/slurm_cluster.py); srun
# sets all of them in every task of a step.
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def in_slurm_step(env=None) -> bool:
  env = os.environ if env is None else env
  return all(v in env for v in SLURM_STEP_VARS)


def _visible_gpus(env) -> int | None:
  """How many GPUs CUDA shows this process (entries of CUDA_VISIBLE_DEVICES), None if unset."""
  if "CUDA_VISIBLE_DEVICES" not in env:
    return None
  return len([e for e in env["CUDA_VISIBLE_DEVICES"].split(",") if e.strip()])


def slurm_local_device_ids(env) -> list[int]:
  """The GPUs a SLURM task drives, as ordinals among the GPUs CUDA shows it.

  ``CUDA_VISIBLE_DEVICES`` is left as SLURM set it (ddx never changes it); JAX renumbers the
  visible GPUs 0..n-1 and ``local_device_ids`` index that list (jax.distributed turns them
  into ``jax_cuda_visible_devices``). So:

  * ``JAX_LOCAL_DEVICE_IDS="0,1"`` (JAX's own override): used as given;
  * ``DDX_GPUS_PER_PROCESS=all`` (one task per node): every visible GPU, 0..n-1, with n the
    entries of ``CUDA_VISIBLE_DEVICES`` or, if that is unset, ``SLURM_GPUS_ON_NODE``. (JAX's
    own SLURM default would be ``[SLURM_LOCALID]`` = [0]: one GPU per node.)
  * ``DDX_GPUS_PER_PROCESS=1`` or unset (one task per GPU): ``[SLURM_LOCALID]``, JAX's own
    default, when the task sees all of its node's GPUs; ``[0]`` when SLURM bound the task to
    a single GPU (``--gpus-per-task=1`` / ``--gpu-bind``: one visible entry).

  Raises ValueError when an id is not among the visible GPUs (e.g. the task sees one GPU,
  renumbered 0, and is asked for GPU 3).
  """
  visible = _visible_gpus(env)
  mode = env.get("DDX_GPUS_PER_PROCESS", "1")
  if mode not in ("1", "all"):
    raise ValueError(f"DDX_GPUS_PER_PROCESS: must be 1 or all, got {mode!r}")
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    try:
      ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    except ValueError:
      raise ValueError(
        f"JAX_LOCAL_DEVICE_IDS: must be comma-separated integers, got {env['JAX_LOCAL_DEVICE_IDS']!r}"
      ) from None
    what = "JAX_LOCAL_DEVICE_IDS"
  elif mode == "all":
    if env.get("SLURM_NTASKS_PER_NODE", "1") != "1":
      raise ValueError(
        "DDX_GPUS_PER_PROCESS: all drives every GPU of the node from one task, so it needs "
        f"--ntasks-per-node=1, got SLURM_NTASKS_PER_NODE={env['SLURM_NTASKS_PER_NODE']}"
      )
    n = visible if visible is not None else int(env.get("SLURM_GPUS_ON_NODE", "0"))
    if n < 1:
      raise ValueError(
        "DDX_GPUS_PER_PROCESS: all needs CUDA_VISIBLE_DEVICES or SLURM_GPUS_ON_NODE to count "
        f"this node's GPUs, got CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r}, "
        f"SLURM_GPUS_ON_NODE={env.get('SLURM_GPUS_ON_NODE')!r}"
      )
    return list(range(n))
  else:
    ids = [0] if visible == 1 else [int(env["SLURM_LOCALID"])]
    what = "SLURM_LOCALID"
  if visible is not None and max(ids) >= visible:
    raise ValueError(
      f"{what}: GPU ordinal(s) {ids} are not among the {visible} GPU(s) this task sees "
      f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}), got {env.get(what)!r}"
    )
  return ids


# The environment that decides which devices a process drives (printed by `device_report`).
REPORT_ENV = (
  "CUDA_VISIBLE_DEVICES",
  "JAX_LOCAL_DEVICE_IDS",
  "DDX_GPUS_PER_PROCESS",
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NODEID",
  "SLURM_PROCID",
  "SLURM_LOCALID",
  "SLURM_NTASKS",
  "SLURM_GPUS_ON_NODE",
  "TPU_WORKER_ID",
)


def device_report() -> dict:
  """What this process drives: process index/count, host, backend, its local devices (global
  id, kind, local hardware id = the ordinal among the GPUs CUDA shows it), the
  ``local_device_ids`` jax.distributed applied (``"all"``: not restricted), the coordinator
  and the environment variables in `REPORT_ENV` that are set."""
  return {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "host": socket.gethostname(),
    "backend": jax.default_backend(),
    "device_count": jax.device_count(),
    "devices": [
      {"id": d.id, "kind": d.device_kind, "local_hardware_id": d.local_hardware_id} for d in jax.local_devices()
    ],
    "local_device_ids": jax.config.read("jax_cuda_visible_devices"),
    "coordinator": distributed.global_state.coordinator_address,
    "env": {k: os.environ[k] for k in REPORT_ENV if k in os.environ},
  }


def format_device_report(r: dict) -> str:
  """One line: ``process I/N (host H): K local <backend> devices [id: kind #local_hw, ...] of M; key=value...``."""
  devs = ", ".join(f"{d['id']}: {d['kind']} #{d['local_hardware_id']}" for d in r["devices"])
  kv = {
    "local_device_ids": r["local_device_ids"],
    **({"coordinator": r["coordinator"]} if r["coordinator"] else {}),
    **r["env"],
  }
  return (
    f"process {r['process_index']}/{r['process_count']} (host {r['host']}): {len(r['devices'])} local "
    f"{r['backend']} devices [{devs}] of {r['device_count']}; " + " ".join(f"{k}={v}" for k, v in kv.items())
  )


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices, all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,))


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """The training mesh: ``("data", "fsdp")`` of shape ``(n / fsdp, fsdp)`` over ``devices``
  (default: all devices of all processes, in the topology-aware order of `jax.make_mesh`, so
  that an fsdp group is a block of neighbouring chips). Auto axes: the shardings of the jitted
  step's inputs and outputs decide, and XLA propagates them."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
    raise ValueError(f"parallel.fsdp: must be a positive divisor of the {n} devices, got {fsdp!r}")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((n // fsdp, fsdp), (DATA, FSDP), axis_types=(auto, auto), devices=devices)


def batch_axes(mesh: Mesh) -> str | tuple[str, ...]:
  """The mesh axes the batch is split over: ``"data"``, and ``"fsdp"`` where the mesh has it
  (every device then holds a different slice of the batch)."""
  axes = tuple(a for a in (DATA, FSDP) if a in mesh.axis_names)
  return axes[0] if len(axes) == 1 else axes


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `batch_axes`."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How parameters (and the gradients, Adam moments and EMA that follow them) are split over
  the ``"fsdp"`` axis.

  ``min_size``: leaves with fewer elements stay replicated (biases, norms, small kernels:
  splitting them saves little and costs a collective each). ``overrides``: ``(regex, dim)``
  pairs tried in order against a leaf's path (`leaf_path`, e.g. ``"down/0/conv/kernel"``,
  `re.search`); the first match decides: ``dim`` an int splits that dimension (it must be
  divisible), None replicates.
  """

  min_size: int = 2**14
  overrides: tuple[tuple[str, int | None], ...] = ()

  def __post_init__(self):
    if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
      raise ValueError(f"parallel.fsdp_min_size: must be an integer >= 0, got {self.min_size!r}")
    for pattern, dim in self.overrides:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"parallel.fsdp_overrides: {pattern!r} is not a regular expression ({e})") from None
      if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise ValueError(f"parallel.fsdp_overrides: the dimension for {pattern!r} must be an int or none, got {dim!r}")

  @classmethod
  def parse(cls, min_size: int, overrides) -> ShardingRules:
    """From config strings ``"REGEX=DIM"`` / ``"REGEX=none"`` (split at the last ``=``)."""
    pairs = []
    for item in overrides or ():
      if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"parallel.fsdp_overrides: entries are 'REGEX=DIM' or 'REGEX=none', got {item!r}")
      pattern, dim = item.rsplit("=", 1)
      dim = dim.strip().lower()
      if dim != "none" and not re.fullmatch(r"-?\d+", dim):
        raise ValueError(f"parallel.fsdp_overrides: the dimension in {item!r} must be an integer or none")
      pairs.append((pattern, None if dim == "none" else int(dim)))
    return cls(min_size=min_size, overrides=tuple(pairs))


def leaf_path(path) -> str:
  """A pytree key path as ``"a/b/0/kernel"`` (dict keys and sequence indices; attribute keys
  such as an nnx Variable's ``.value`` are left out)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
  return "/".join(parts)


def param_spec(path: str, shape: tuple[int, ...], fsdp: int, rules: ShardingRules = ShardingRules()) -> P:
  """The `PartitionSpec` of a parameter ``shape`` at ``path`` on an fsdp axis of size ``fsdp``
  (see `ShardingRules`). Ties between equally large dimensions go to the last (a kernel's
  output features)."""
  ndim = len(shape)
  for pattern, dim in rules.overrides:
    if re.search(pattern, path):
      if dim is None or fsdp == 1:
        return P()
      if not -ndim <= dim < ndim:
        raise ValueError(f"parallel.fsdp_overrides: {pattern!r} names dimension {dim} of {path} {tuple(shape)}")
      dim %= ndim
      if shape[dim] % fsdp:
        raise ValueError(
          f"parallel.fsdp_overrides: {pattern!r} splits dimension {dim} of {path} {tuple(shape)}, which the fsdp "
          f"axis of size {fsdp} does not divide"
        )
      return P(*([None] * dim + [FSDP]))
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < rules.min_size:
    return P()
  fits = [d for d in range(ndim) if shape[d] % fsdp == 0]
  if not fits:
    return P()
  dim = max(fits, key=lambda d: (shape[d], d))
  return P(*([None] * dim + [FSDP]))


def param_shardings(params: Any, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> Any:
  """A pytree of `NamedSharding` like ``params`` (arrays or ShapeDtypeStructs), by `param_spec`
  on ``mesh``'s ``"fsdp"`` axis (size 1 if it has none)."""
  fsdp = dict(mesh.shape).get(FSDP, 1)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: NamedSharding(mesh, param_spec(leaf_path(path), tuple(x.shape), fsdp, rules)), params
  )


def place(tree: Any, shardings: Any):
  """Place a host-complete pytree with the given shardings (a tree like ``tree``, or one
  sharding for all): works across processes, each filling its own devices from its own
  identical copy."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

  def put(x, sharding):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree, shardings)


def device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) under ``shardings``
  (the largest shard of each leaf, summed)."""
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def replicate(tree, mesh: Mesh):
  """Place a host-complete pytree on every device of ``mesh`` (see `place`)."""
  return place(tree, replicated(mesh))


def check_batch(global_batch_size: int, mesh: Mesh, what: str = "global_batch_size") -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f"{what}: {global_batch_size} is not divisible by the {n} devices of the mesh")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{what}: {global_batch_size} is not divisible by the {jax.process_count()} processes")


_BARRIERS = itertools.count()


def barrier(name: str, timeout_seconds: int = 3600) -> None:
  """Block until every process has reached its ``barrier(name)`` (returns at once with one
  process). Every process must call the same barriers in the same order.

  The wait goes through the coordination service's key-value store, not through a device
  collective. That matters on CPU: XLA's gloo collectives give the peers of a new set of
  devices only 30 s to meet at their first collective, and processes whose compile times
  differ by more than that (a loaded host, a warm compilation cache on one of them) fail
  with "Gloo context initialization failed". Compiling ahead and meeting here first
  removes that skew.
  """
  if jax.process_count() == 1:
    return
  key = f"ddx/{name}/{next(_BARRIERS)}"
  ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_seconds * 1000)


# what a collective or a coordination call says when its peer has gone
_PEER_ERRORS = ("gloo", "connection reset", "socket closed", "broken pipe", "unavailable", "heartbeat")


class PeerWatchdog:
  """While active, exit this process with one line when another process of a multi-process
  run stops responding, instead of waiting in a collective that will never complete.

  Every process bumps a counter in the coordination service's key-value store every
  ``interval`` seconds and watches the others' counters by its own clock (no clock skew
  between hosts matters). A peer whose counter has not moved for ``timeout`` seconds, or a
  coordinator that cannot be reached for as long, ends this process: one line on stderr naming
  the lost process, then ``os._exit(1)`` (a thread cannot unwind a main thread blocked in a
  collective). JAX's own heartbeat would abort the process later (about a minute, with a
  C++ stack trace). Peers that finished (`__exit__` marks them done) are not waited for.
  ``timeout`` defaults to ``DDX_PEER_TIMEOUT_SECONDS`` or 30. A no-op in a single process.
  Every process must start the same watchdogs in the same order (their keys are numbered).
  """

  def __init__(self, name: str, *, timeout: float | None = None, interval: float = 1.0):
    self.name = name
    self.timeout = float(os.environ.get("DDX_PEER_TIMEOUT_SECONDS", 30)) if timeout is None else timeout
    self.interval = interval
    self._stop = threading.Event()
    self._threads: list[threading.Thread] = []

  def __enter__(self) -> PeerWatchdog:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def start(self) -> PeerWatchdog:
    if jax.process_count() == 1:
      return self
    self._client = distributed.global_state.client
    self._me, self._n = jax.process_index(), jax.process_count()
    self._prefix = f"ddx/watchdog/{self.name}/{next(_BARRIERS)}"
    self._last_ok = time.monotonic()
    self._seen = {k: (None, time.monotonic()) for k in range(self._n) if k != self._me}
    self._threads = [
      threading.Thread(target=self._beat, daemon=True),
      threading.Thread(target=self._watch, daemon=True),
    ]
    for t in self._threads:
      t.start()
    return self

  def stop(self) -> None:
    """Mark this process done (its peers stop watching it) and end the threads."""
    if not self._threads:
      return
    self._stop.set()
    try:
      self._client.key_value_set(f"{self._prefix}/done/{self._me}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 -- the run is ending; a peer that is gone cannot be told
      pass
    for t in self._threads:
      t.join(timeout=5)
    self._threads = []

  def _beat(self) -> None:
    # the only thread that talks to the coordination service (an RPC to a dead coordinator
    # may block; `_watch` notices that from the clock alone)
    while not self._stop.is_set():
      try:
        self._client.key_value_increment(f"{self._prefix}/beat/{self._me}", 1)
        beats = dict(self._client.key_value_dir_get(f"{self._prefix}/beat/"))
        done = {k.rsplit("/", 1)[1] for k, _ in self._client.key_value_dir_get(f"{self._prefix}/done/")}
      except Exception:  # noqa: BLE001 -- any failure to reach the coordinator counts as silence
        self._stop.wait(self.interval)
        continue
      now = time.monotonic()
      self._last_ok = now
      for k in list(self._seen):
        if str(k) in done:
          del self._seen[k]
          continue
        value = next((v for key, v in beats.items() if key.rsplit("/", 1)[1] == str(k)), None)
        if value != self._seen[k][0]:
          self._seen[k] = (value, now)
      self._stop.wait(self.interval)

  def _watch(self) -> None:
    while not self._stop.wait(self.interval):
      now = time.monotonic()
      if now - self._last_ok > self.timeout:
        self._exit(
          f"the coordinator (process 0, {distributed.global_state.coordinator_address}) could not be "
          f"reached for {self.timeout:.0f} s"
        )
      for k, (_, since) in list(self._seen.items()):
        if now - since > self.timeout:
          self._exit(f"process {k} of {self._n} stopped responding {self.timeout:.0f} s ago (killed or its host lost)")

  def on_error(self, error: BaseException) -> None:
    """Call with an error about to leave the watched section. A collective whose peer died
    can fail at once ("Connection reset by peer") rather than wait; if the error reads like a
    lost connection, this waits for the watchdog to name the lost process and end this one
    (up to ``timeout`` and a margin), so that the report is the one line. Returns if no peer
    turns out lost: the error is then the report."""
    if not self._threads:
      return
    chain, x = [], error
    while x is not None and len(chain) < 10:
      chain.append(str(x).lower())
      x = x.__cause__ or x.__context__
    if not any(p in text for p in _PEER_ERRORS for text in chain):
      return
    deadline = time.monotonic() + self.timeout + 3 * self.interval + 5
    while time.monotonic() < deadline and not self._stop.is_set():
      time.sleep(0.2)

  def _exit(self, why: str) -> None:
    if self._stop.is_set():
      return
    sys.stderr.write(
      f"ddx {self.name}: {why}; process {self._me} exits. Rerun the same command on every host to resume "
      "from the newest checkpoint that verifies.\n"
    )
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def compile_then_meet(fn, *args, name: str):
  """``fn.lower(*args).compile()`` (``fn`` jitted), then :func:`barrier`: the compiled
  executable, to be called with arguments shaped and sharded like ``args``."""
  compiled = fn.lower(*args).compile()
  barrier(name)
  return compiled


def to_host(x) -> np.ndarray:
  """The whole value of an array as one numpy array on every process: a device fetch for
  an addressable array, the local copy of a replicated one, an allgather (a collective:
  every process must call it) for one sharded across processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def host_key_data(key: jax.Array) -> np.ndarray:
  """uint32 key data of a (typed or raw) key, for checkpoints and logging."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(jax.device_get(key), np.uint32)
