"""ddx: denoising diffusion models in JAX/Flax.

The public surface::

    import ddx
    sched = ddx.schedules.make("linear", num_timesteps=1000)
    sampler = ddx.samplers.make("ddim", sched, num_steps=50, eta=0.0)
    x0 = ddx.sample(model_fn, sampler, x_T, key)

Layers, each importing only from the ones above it:

* the pure core, imported eagerly (small, no Flax modules): ``ddx.schedules``,
  ``ddx.diffusion``, ``ddx.losses``, ``ddx.samplers``, ``ddx.sampling`` (the ``lax.scan``
  driver, ``ddx.sample``), ``ddx.guidance``, ``ddx.edit``, ``ddx.parallel``, ``ddx.images``;
* ``ddx.models`` (networks and their importers), ``ddx.data`` (sources and the grain
  pipeline), ``ddx.eval`` (sample-quality metrics);
* ``ddx.training`` (train step, loop, checkpoints) and ``ddx.latent`` (latent diffusion,
  Stable Diffusion pipeline folders);
* ``ddx.cli``: the ``python -m ddx`` commands.

The last three layers are imported on first use (``ddx.models`` and the rest pull in Flax NNX
modules, grain, TFDS and the optional extras).
"""

from __future__ import annotations

import importlib

from ddx import diffusion, edit, edm, guidance, images, losses, parallel, samplers, sampling, schedules
from ddx.sampling import sample
from ddx.schedules import Schedule

_LAZY = ("models", "data", "eval", "training", "latent", "cli")

__all__ = [
  "schedules",
  "samplers",
  "sample",
  "sampling",
  "Schedule",
  "diffusion",
  "edm",
  "losses",
  "guidance",
  "edit",
  "parallel",
  "images",
  *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in _LAZY:
    return importlib.import_module(f"ddx.{name}")
  raise AttributeError(f"module 'ddx' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
