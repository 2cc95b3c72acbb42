"""Meshes, shardings and multi-host initialisation.

ddx is data parallel: one mesh axis ``"data"`` over every device of every process. Global
arrays (the batch) are sharded along their leading axis; parameters, optimizer state and EMA
are replicated. The same jitted program runs on one CPU, 8 fake CPU devices or a TPU pod.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None) -> None:
  """Start multi-controller JAX when asked to, before any other JAX call.

  * explicit arguments, or ``DDX_COORDINATOR`` / ``DDX_NUM_PROCESSES`` / ``DDX_PROCESS_ID``
    (and optionally ``DDX_COORDINATOR_BIND``, the address process 0 listens on): used as
    given (the local launcher: 127.0.0.1:PORT);
  * ``DDX_DISTRIBUTED=auto`` (TPU pods, launch/tpu_pod.sh) or a SLURM job with several
    tasks: ``jax.distributed.initialize()`` auto-detects everything;
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
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               coordinator_bind_address=os.environ.get("DDX_COORDINATOR_BIND"))
  elif os.environ.get("DDX_DISTRIBUTED") == "auto" or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices, all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``"data"``."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Place a host-complete pytree on every device of ``mesh`` (works across processes: each
  process fills its own devices from its own identical copy)."""
  repl = replicated(mesh)

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, repl, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree)


def check_batch(global_batch_size: int, mesh: Mesh, what: str = "global_batch_size") -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f"{what}: {global_batch_size} is not divisible by the {n} devices of the mesh")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{what}: {global_batch_size} is not divisible by the {jax.process_count()} processes")


def host_key_data(key: jax.Array) -> np.ndarray:
  """uint32 key data of a (typed or raw) key, for checkpoints and logging."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(jax.device_get(key), np.uint32)
