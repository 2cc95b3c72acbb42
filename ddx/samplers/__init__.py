"""Samplers: one file per sampler, each a pure step with explicit noise (see `base`).

    sampler = ddx.samplers.make("ddim", sched, num_steps=50, eta=0.0)

Names: "ddpm", "ddim", "plms", "dpm_solver++" (alias "dpmpp_2m") and its presets
"dpm_solver++_3m", "dpm_solver++_sde", "dpm_solver++_3m_sde" (aliases "dpmpp_3m",
"dpmpp_2m_sde", "dpmpp_3m_sde"), "unipc", the σ-space samplers "euler", "euler_ancestral",
"heun", "lms" (`sigmas`), "flow_euler", "flow_heun" for rectified-flow models and "edm_euler",
"edm_heun" for EDM-preconditioned ones. Keyword arguments go to
the sampler's own ``make``; unknown ones raise a ValueError naming them.
"""

from __future__ import annotations

import functools
import inspect

from ddx.samplers import base, ddim, ddpm, dpm_solver, edm, euler, flow, grids, heun, lms, plms, sigmas, unipc  # noqa: F401 -- ddx.samplers.<module>
from ddx.samplers.base import Sampler, X0Processing
from ddx.samplers.ddim import DDIM
from ddx.samplers.ddpm import DDPM
from ddx.samplers.dpm_solver import DPMSolverPP
from ddx.samplers.euler import Euler
from ddx.samplers.heun import Heun
from ddx.samplers.lms import LMS
from ddx.samplers.plms import PLMS
from ddx.samplers.unipc import UniPC

# name -> (maker, sampler class)
_SAMPLERS = {
  "ddpm": (ddpm.make, DDPM),
  "ddim": (ddim.make, DDIM),
  "plms": (plms.make, PLMS),
  "dpm_solver++": (dpm_solver.make, DPMSolverPP),
  # the presets users know as DPM++ 3M, DPM++ 2M SDE and DPM++ 3M SDE (knobs still overridable)
  "dpm_solver++_3m": (functools.partial(dpm_solver.make, solver_order=3), DPMSolverPP),
  "dpm_solver++_sde": (functools.partial(dpm_solver.make, algorithm="sde"), DPMSolverPP),
  "dpm_solver++_3m_sde": (functools.partial(dpm_solver.make, solver_order=3, algorithm="sde"), DPMSolverPP),
  "unipc": (unipc.make, UniPC),
  "euler": (euler.make, Euler),
  "euler_ancestral": (euler.make_ancestral, Euler),
  "heun": (heun.make, Heun),
  "lms": (lms.make, LMS),
  # for rectified-flow models (diffusion.kind = "flow")
  "flow_euler": (flow.make_euler, Euler),
  "flow_heun": (flow.make_heun, Heun),
  # for EDM-preconditioned models (diffusion.kind = "edm"; the model is ddx.edm.precondition's D)
  "edm_euler": (edm.make_euler, Euler),
  "edm_heun": (edm.make_heun, Heun),
}
_ALIASES = {
  "dpmpp_2m": "dpm_solver++",
  "dpm++": "dpm_solver++",
  "dpmpp_3m": "dpm_solver++_3m",
  "dpmpp_2m_sde": "dpm_solver++_sde",
  "dpmpp_3m_sde": "dpm_solver++_3m_sde",
  "pndm": "plms",
  "euler_a": "euler_ancestral",
}
NAMES = tuple(_SAMPLERS)
# the samplers a run may start mid-grid with or revisit calls of (the editors' choices)
SINGLE_STEP_NAMES = tuple(n for n, (_, cls) in _SAMPLERS.items() if cls.single_step)
# the samplers of rectified-flow models, and the σ-space samplers of the others
FLOW_NAMES = ("flow_euler", "flow_heun")
EDM_NAMES = ("edm_euler", "edm_heun")
SIGMA_NAMES = tuple(
  n for n, (_, cls) in _SAMPLERS.items() if issubclass(cls, sigmas.SigmaCommon) and n not in FLOW_NAMES + EDM_NAMES
)
# the samplers that take a noise-level grid (``sigmas="karras"`` ...)
GRID_NAMES = tuple(n for n, (mk, _) in _SAMPLERS.items() if "sigmas" in inspect.signature(mk).parameters)


def canonical(name: str) -> str:
  """The canonical sampler name for ``name`` or an alias (ValueError if unknown)."""
  key = _ALIASES.get(name, name)
  if key not in _SAMPLERS:
    raise ValueError(f"name: unknown sampler {name!r}; expected one of {NAMES}")
  return key


def make(name: str, sched, num_steps: int | None = None, **kwargs):
  """Build sampler ``name`` for schedule ``sched`` with ``num_steps`` steps (S)."""
  key = canonical(name)
  maker = _SAMPLERS[key][0]
  params = inspect.signature(maker).parameters
  unknown = [k for k in kwargs if k not in params]
  if unknown:
    raise ValueError(
      f"{unknown[0]}: not an argument of the {key!r} sampler "
      f"(accepted: {', '.join(p for p in params if p not in ('sched', 'num_steps'))})"
    )
  if num_steps is None and key != "ddpm" and kwargs.get("timesteps") is None:
    raise ValueError(f"num_steps: required for the {key!r} sampler")
  return maker(sched, num_steps, **kwargs)


__all__ = [
  "make",
  "canonical",
  "NAMES",
  "SINGLE_STEP_NAMES",
  "SIGMA_NAMES",
  "FLOW_NAMES",
  "EDM_NAMES",
  "GRID_NAMES",
  "Sampler",
  "X0Processing",
  "DDPM",
  "DDIM",
  "PLMS",
  "DPMSolverPP",
  "Euler",
  "Heun",
  "LMS",
  "UniPC",
]
