"""ddx.data: random-access image sources and a stateless, step-indexed grain pipeline.

Typical use (configs are read at the entrypoint; everything here takes plain
arguments)::

    from ddx import data
    src = data.make_source("digits", image_size=16)          # offline default
    pidx, pcount = data.process_slice(mesh, global_batch_size)
    it = data.make_batches(src, seed=0, global_batch_size=128,
                           start_step=step, process_index=pidx,
                           process_count=pcount, random_flip=True)
    batch = data.to_global_array(next(it), mesh)             # sharded P('data')

The batch at step ``k`` is a pure function of ``(seed, k)`` and identical for
any number of processes/devices; resuming needs only ``start_step``. See
``ddx.data.pipeline`` for the order and epoch policy and
``ddx.data.tfds_sources`` for the one-time TFDS prepare step.
"""

from ddx.data.digits import DigitsSource
from ddx.data.pipeline import (
  get_batch,
  make_batches,
  make_dataset,
  process_slice,
  to_global_array,
)
from ddx.data.sources import DATASETS, make_source
from ddx.data.tfds_sources import TFDS_DATASETS, TfdsImageSource, prepare

__all__ = [
  "DATASETS",
  "DigitsSource",
  "TFDS_DATASETS",
  "TfdsImageSource",
  "get_batch",
  "make_batches",
  "make_dataset",
  "make_source",
  "prepare",
  "process_slice",
  "to_global_array",
]
