"""Samplers: one file per sampler, each a pure step with explicit noise (see `base`).

    sampler = ddx.samplers.make("ddim", sched, num_steps=50, eta=0.0)

Names: "ddpm", "ddim", "plms", "dpm_solver++" (alias "dpmpp_2m"). Keyword arguments go to
the sampler's own ``make``; unknown ones raise a ValueError naming them.
"""

from __future__ import annotations

import inspect

from ddx.samplers import base, ddim, ddpm, dpm_solver, grids, plms
from ddx.samplers.base import Sampler, X0Processing
from ddx.samplers.ddim import DDIM
from ddx.samplers.ddpm import DDPM
from ddx.samplers.dpm_solver import DPMSolverPP
from ddx.samplers.plms import PLMS

_MAKERS = {
    "ddpm": ddpm.make,
    "ddim": ddim.make,
    "plms": plms.make,
    "dpm_solver++": dpm_solver.make,
}
_ALIASES = {"dpmpp_2m": "dpm_solver++", "dpm++": "dpm_solver++", "pndm": "plms"}
NAMES = tuple(_MAKERS)


def canonical(name: str) -> str:
  """The canonical sampler name for ``name`` or an alias (ValueError if unknown)."""
  key = _ALIASES.get(name, name)
  if key not in _MAKERS:
    raise ValueError(f"name: unknown sampler {name!r}; expected one of {NAMES}")
  return key


def make(name: str, sched, num_steps: int | None = None, **kwargs):
  """Build sampler ``name`` for schedule ``sched`` with ``num_steps`` steps (S)."""
  key = _ALIASES.get(name, name)
  if key not in _MAKERS:
    raise ValueError(f"name: unknown sampler {name!r}; expected one of {NAMES}")
  maker = _MAKERS[key]
  params = inspect.signature(maker).parameters
  unknown = [k for k in kwargs if k not in params]
  if unknown:
    raise ValueError(f"{unknown[0]}: not an argument of the {key!r} sampler "
                     f"(accepted: {', '.join(p for p in params if p not in ('sched', 'num_steps'))})")
  if num_steps is None and key != "ddpm" and kwargs.get("timesteps") is None:
    raise ValueError(f"num_steps: required for the {key!r} sampler")
  return maker(sched, num_steps, **kwargs)


__all__ = ["make", "canonical", "NAMES", "Sampler", "X0Processing", "DDPM", "DDIM", "PLMS", "DPMSolverPP"]
