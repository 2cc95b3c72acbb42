"""Stateless, step-indexed input pipeline on grain.

Data order is a pure function of ``(seed, step)``
-------------------------------------------------
The training stream is an infinite sequence of example *positions*
``g = 0, 1, 2, ...``; the global batch at step ``k`` holds positions
``k * B .. k * B + B - 1`` (``B`` = global batch size). Position ``g`` reads

* epoch ``e = g // N`` and slot ``i = g % N`` (``N = len(source)``);
* record ``perm_e(i)``, where ``perm_e`` is a permutation of ``range(N)``
  (grain's ``index_shuffle``, a keyed bijection evaluated per index, no table)
  keyed by a 32-bit hash of ``(seed, e)``: every epoch has a fresh order;
* a horizontal flip (if ``random_flip``) iff one bit of a hash of ``(seed, g)``
  is set: the flip depends on the global position, so on neither the number
  of processes nor the epoch's record.

Epoch boundary policy: epochs are contiguous runs of ``N`` positions in the
stream and batches run straight across them (no dropped or padded examples),
so each window ``[e * N, (e + 1) * N)`` visits every record exactly once. When
``B`` divides ``N`` every batch lies inside one epoch.

Process ``p`` of ``P`` reads only rows ``[p * B / P, (p + 1) * B / P)`` of each
global batch, so the global batch is identical for any process (or device)
count. There is no iterator state to checkpoint: to resume at step ``k`` build
the iterator with ``start_step=k``.

Reading goes through grain: a ``MapDataset`` over host-local positions, mapped
through the pure element function and batched, turned into an ``IterDataset``
(optional read threads, order preserving), optionally prefetched by worker
processes (order preserving as well).
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

Batch = dict[str, np.ndarray]

_MASK64 = (1 << 64) - 1
_SHUFFLE_TAG = 0x5348554646  # "SHUFF"
_FLIP_TAG = 0x464C4950  # "FLIP"
_SHUFFLE_ROUNDS = 4


def _mix64(x: int) -> int:
  """splitmix64 finaliser: a fixed, well-mixed bijection of 64-bit ints."""
  x = (x + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def _hash(*values: int) -> int:
  h = 0
  for v in values:
    h = _mix64(h ^ _mix64(v & _MASK64))
  return h


def epoch_seed(seed: int, epoch: int) -> int:
  """32-bit key of epoch ``epoch``'s permutation."""
  return _hash(seed, _SHUFFLE_TAG, epoch) & 0xFFFFFFFF


def record_index(seed: int, position: int, num_records: int, *, shuffle: bool = True) -> int:
  """Source record read at global stream position ``position``."""
  epoch, slot = divmod(position, num_records)
  if not shuffle or num_records == 1:
    return slot
  return int(
    grain.experimental.index_shuffle(
      slot,
      max_index=num_records - 1,
      seed=epoch_seed(seed, epoch),
      rounds=_SHUFFLE_ROUNDS,
    )
  )


def flip_bit(seed: int, position: int) -> bool:
  """Whether the example at global position ``position`` is mirrored."""
  return bool(_hash(seed, _FLIP_TAG, position) >> 63)


# ----------------------------------------------------------------- validation


def _check_int(value, name: str, *, minimum: int) -> int:
  if isinstance(value, bool):
    raise ValueError(f"{name}: must be an int, got {value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name}: must be an int, got {value!r}") from None
  if value < minimum:
    raise ValueError(f"{name}: must be >= {minimum}, got {value}")
  return value


def _resolve_process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  process_count = _check_int(process_count, "process_count", minimum=1)
  process_index = _check_int(process_index, "process_index", minimum=0)
  if process_index >= process_count:
    raise ValueError(f"process_index: must be < process_count={process_count}, got {process_index}")
  return process_index, process_count


class _ExampleAt:
  """Host-local element ``j`` -> example dict. Pure, picklable."""

  def __init__(
    self,
    source,
    *,
    seed: int,
    global_batch_size: int,
    start_step: int,
    process_index: int,
    process_count: int,
    random_flip: bool,
    shuffle: bool,
  ):
    self.source = source
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.start_step = start_step
    self.row_offset = process_index * self.local_batch_size
    self.random_flip = random_flip
    self.shuffle = shuffle
    self.num_records = len(source)

  def position(self, j: int) -> int:
    step = self.start_step + j // self.local_batch_size
    row = self.row_offset + j % self.local_batch_size
    return step * self.global_batch_size + row

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    g = self.position(int(j))
    example = self.source[record_index(self.seed, g, self.num_records, shuffle=self.shuffle)]
    image = np.asarray(example["image"], np.float32)
    if self.random_flip and flip_bit(self.seed, g):
      image = image[:, ::-1]
    return {
      "image": np.ascontiguousarray(image),
      "label": np.asarray(example["label"], np.int32),
    }


def _make_element_fn(
  source,
  *,
  seed,
  global_batch_size,
  start_step,
  process_index,
  process_count,
  random_flip,
  shuffle,
) -> _ExampleAt:
  seed = _check_int(seed, "seed", minimum=0)
  if seed > _MASK64:
    raise ValueError(f"seed: must be < 2**64, got {seed}")
  global_batch_size = _check_int(global_batch_size, "global_batch_size", minimum=1)
  start_step = _check_int(start_step, "start_step", minimum=0)
  process_index, process_count = _resolve_process(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size: {global_batch_size} must be divisible by process_count={process_count}")
  if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
    raise ValueError(f"source: must be a random-access source, got {source!r}")
  if len(source) < 1:
    raise ValueError("source must hold at least one example")
  return _ExampleAt(
    source,
    seed=seed,
    global_batch_size=global_batch_size,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    random_flip=bool(random_flip),
    shuffle=bool(shuffle),
  )


# ------------------------------------------------------------------- public


def make_dataset(
  source,
  *,
  seed: int,
  global_batch_size: int,
  start_step: int = 0,
  num_steps: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  random_flip: bool = False,
  shuffle: bool = True,
  num_threads: int = 0,
  prefetch_buffer_size: int = 8,
  num_workers: int = 0,
) -> grain.IterDataset:
  """grain ``IterDataset`` of host-local batches for steps ``start_step, ...``.

  Each element is ``{"image": float32 [B/P, H, W, C], "label": int32 [B/P]}``:
  rows ``[p*B/P, (p+1)*B/P)`` of the global batch of that step (see the module
  docstring for the order). Iterating it twice gives the same batches.

  Args:
    source: random-access source (``__len__``, ``__getitem__``) of
      ``{"image", "label"}`` dicts, e.g. from ``ddx.data.make_source``.
    seed: non-negative int; with the step it fixes every batch.
    global_batch_size: ``B``, summed over all processes.
    start_step: first step produced (resume point).
    num_steps: number of steps to produce; ``None`` = endless.
    process_index, process_count: this host's slice; default
      ``jax.process_index()`` / ``jax.process_count()``.
    random_flip: mirror images horizontally with probability 1/2.
    shuffle: ``False`` reads records in order (every epoch the same).
    num_threads: grain read threads (0 = read in the iterating thread; best
      for in-memory sources; a few help for TFDS/ArrayRecord decoding).
    prefetch_buffer_size: grain read-ahead, in batches (with threads only).
    num_workers: grain worker processes (0 = none). Output order is the same.
  """
  fn = _make_element_fn(
    source,
    seed=seed,
    global_batch_size=global_batch_size,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    random_flip=random_flip,
    shuffle=shuffle,
  )
  if num_steps is None:
    num_elements = (sys.maxsize // fn.global_batch_size) * fn.local_batch_size
  else:
    num_elements = _check_int(num_steps, "num_steps", minimum=0) * fn.local_batch_size
  num_threads = _check_int(num_threads, "num_threads", minimum=0)
  prefetch_buffer_size = _check_int(prefetch_buffer_size, "prefetch_buffer_size", minimum=0)
  num_workers = _check_int(num_workers, "num_workers", minimum=0)

  # Batch while still a MapDataset: the batches are then the random-access
  # elements, so read threads and worker processes (which slice the MapDataset
  # element-wise) each produce whole batches, in order.
  ds = grain.MapDataset.range(0, num_elements).map(fn)
  ds = ds.batch(fn.local_batch_size, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
  if num_workers > 0:
    # grain reads absl flags in its workers; outside absl.app they are unparsed.

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def make_batches(source, **kwargs) -> Iterator[Batch]:
  """Iterator over host-local numpy batches; arguments as ``make_dataset``."""
  return iter(make_dataset(source, **kwargs))


def get_batch(
  source,
  step: int,
  *,
  seed: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  random_flip: bool = False,
  shuffle: bool = True,
) -> Batch:
  """The host-local batch at ``step`` computed directly (no grain, no threads).

  Equal to the first batch of ``make_batches(..., start_step=step)``; with the
  default ``process_index=0, process_count=1`` it is the whole global batch.
  """
  fn = _make_element_fn(
    source,
    seed=seed,
    global_batch_size=global_batch_size,
    start_step=_check_int(step, "step", minimum=0),
    process_index=process_index,
    process_count=process_count,
    random_flip=random_flip,
    shuffle=shuffle,
  )
  examples = [fn(j) for j in range(fn.local_batch_size)]
  return {k: np.stack([e[k] for e in examples]) for k in ("image", "label")}


# ------------------------------------------------------------ global arrays


def _data_sharding(mesh, axis: str):

  if axis not in mesh.axis_names:
    raise ValueError(f"axis: must be a mesh axis {tuple(mesh.axis_names)}, got {axis!r}")
  return NamedSharding(mesh, PartitionSpec(axis))


def process_slice(mesh, global_batch_size: int, *, axis: str = "data") -> tuple[int, int]:
  """``(process_index, process_count)`` to pass to ``make_batches`` for ``mesh``.

  Reads which rows of a ``[global_batch_size]`` array sharded as
  ``P(axis)`` this process's devices hold. They must be one contiguous block
  of ``global_batch_size / count`` rows; the block number is returned, so the
  host-local batches assemble into exactly the global batch of the pipeline
  even when the mesh does not order devices by process. (With
  ``jax.make_mesh`` it is ``(jax.process_index(), jax.process_count())``.)
  """

  global_batch_size = _check_int(global_batch_size, "global_batch_size", minimum=1)
  sharding = _data_sharding(mesh, axis)
  if global_batch_size % mesh.shape[axis]:
    raise ValueError(
      f"global_batch_size: {global_batch_size} must be divisible by mesh axis {axis!r} of size {mesh.shape[axis]}"
    )
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(global_batch_size)[index[0]])
  lo, hi = min(rows), max(rows) + 1
  local = hi - lo
  if len(rows) != local or global_batch_size % local or lo % local:
    raise ValueError(
      f"process {jax.process_index()} holds rows {sorted(rows)} of the batch, "
      "not one aligned contiguous block; reorder the mesh devices"
    )
  return lo // local, global_batch_size // local


def to_global_array(batch: Mapping[str, Any], mesh, *, axis: str = "data") -> dict[str, Any]:
  """Host-local numpy batch -> global ``jax.Array``s sharded ``P(axis)`` on ``mesh``.

  Each leaf's leading dimension is split over the mesh axis ``axis``; the
  global leading size is ``local size * (processes)``. Works single- and
  multi-process (``jax.make_array_from_process_local_data``). Use
  ``process_slice(mesh, B)`` for the pipeline's process arguments so that the
  rows land where the global batch has them.
  """

  sharding = _data_sharding(mesh, axis)
  # Distinct rows of the data axis this process holds (one per data shard).
  shards = {index[0].start for index in sharding.addressable_devices_indices_map((mesh.shape[axis],)).values()}

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % len(shards):
      raise ValueError(
        f"batch leaves must have a leading size divisible by this process's "
        f"{len(shards)} shards of mesh axis {axis!r}, got shape {x.shape}"
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return {k: put(v) for k, v in batch.items()}
