"""ddx: denoising diffusion models in JAX/Flax.

The public surface::

    import ddx
    sched = ddx.schedules.make("linear", num_timesteps=1000)
    sampler = ddx.samplers.make("ddim", sched, num_steps=50, eta=0.0)
    x0 = ddx.sample(model_fn, sampler, x_T, key)

Modules: ``ddx.schedules``, ``ddx.samplers``, ``ddx.diffusion``, ``ddx.losses``,
``ddx.guidance``, ``ddx.edit`` (imported eagerly: they are small and pure), and ``ddx.models``,
``ddx.data``, ``ddx.classifier``, ``ddx.eval``, ``ddx.latent``, ``ddx.pipeline`` (imported on first
use: they pull in Flax NNX modules, grain, TFDS and the optional extras).
"""

from __future__ import annotations

import importlib

from ddx import diffusion, edit, guidance, losses, samplers, schedules
from ddx.driver import sample
from ddx.schedules import Schedule

_LAZY = ("models", "data", "classifier", "eval", "latent", "pipeline", "parallel")

__all__ = ["schedules", "samplers", "sample", "Schedule", "diffusion", "losses", "guidance", "edit", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in _LAZY:
    return importlib.import_module(f"ddx.{name}")
  raise AttributeError(f"module 'ddx' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
