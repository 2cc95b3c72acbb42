"""Shared machinery for the diffusers-conformance tests (tests/oracle/test_conformance.py) and the
conformance table (benchmarks/conformance_table.py).

* A deterministic nonlinear "model" implemented twice, identically: in jax (for ddx,
  channels-last [B, H, W, C]) and in torch (for diffusers, channels-first [B, C, H, W]). It is
  elementwise in x, so the two layouts only differ by a transpose; its learned-variance
  channels are concatenated along the channel axis of each layout (last in ddx, dim 1 in
  diffusers), which exercises both output splits.
* Runners that drive a diffusers scheduler manually (``set_timesteps``; ``step`` per listed
  timestep) and the same configuration through ``ddx.sample`` (a jitted ``lax.scan``), with
  the stochastic samplers fed *the same noise*: ddx draws call i's noise as
  ``normal(fold_in(key, i), x.shape, float32)`` (ddx/sampling.py); the identical arrays are
  passed to DDIMScheduler.step as ``variance_noise`` and returned by a patched
  ``scheduling_ddpm.randn_tensor`` for DDPMScheduler (which has no noise argument).
* Case tables (one dict per knob combination) so the tests and the table script measure
  exactly the same thing.

Error metric everywhere: ``max|ddx - ref| / max|ref|`` over the final sample (float32 arrays
from both sides, compared in float64).

Precision note: diffusers builds betas / alphas_cumprod in float32 (torch.linspace, torch
cumprod) and does all step arithmetic in float32 at run time; ddx computes schedules and
per-step coefficient tables in float64 on the host and casts them to float32. Their
alphas_cumprod differ by <= ~1e-6 relative for linear / scaled_linear, ~1.3e-5 relative at
the very end of the cosine schedule (ab[999] ~ 2.4e-9), more after the zero-SNR rescale.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import (
  DDIMScheduler,
  DDPMScheduler,
  DPMSolverMultistepScheduler,
  EDMEulerScheduler,
  EulerAncestralDiscreteScheduler,
  EulerDiscreteScheduler,
  FlowMatchEulerDiscreteScheduler,
  FlowMatchHeunDiscreteScheduler,
  HeunDiscreteScheduler,
  LMSDiscreteScheduler,
  PNDMScheduler,
  UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

import ddx

T = 1000
SHAPE = (2, 8, 8, 3)  # ddx layout [B, H, W, C]; diffusers sees [B, C, H, W]
TOL = 1e-5

# ddx schedule name -> diffusers beta_schedule
DIFFUSERS_SCHEDULE = {
  "linear": "linear",
  "scaled_linear": "scaled_linear",
  "cosine": "squaredcos_cap_v2",
  "sigmoid": "sigmoid",
}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's scaled_linear endpoints
# ddx prediction -> diffusers prediction_type
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


# --------------------------------------------------------------------------------------------
# The deterministic nonlinear model, twice.
#   out = tanh(0.7 x + 0.3 sin(x (1 + t/1000))) * (0.8 + 0.2 cos(t/37)) + 0.1 x cos(t/100)
#   var = tanh(0.5 x + sin(t/53))            (learned-variance channels, in [-1, 1])
# x- and t-dependent, so a wrong timestep label (off-by-one, t - T//S vs. next listed) or a
# wrong alpha shows up at once. All arithmetic float32 on both sides.
# --------------------------------------------------------------------------------------------


def _jax_core(x, t):
  tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  out = jnp.tanh(0.7 * x + 0.3 * jnp.sin(x * (1.0 + tf / 1000.0))) * (0.8 + 0.2 * jnp.cos(tf / 37.0))
  return out + 0.1 * x * jnp.cos(tf / 100.0)


def _jax_var(x, t):
  tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.tanh(0.5 * x + jnp.sin(tf / 53.0))


def jax_model(x, t):
  """ddx model_fn: x float32 [B, H, W, C], t int32 [B]."""
  return _jax_core(x, t)


def jax_model_learned(x, t):
  """ddx model_fn with learned-variance channels concatenated along the LAST axis."""
  return jnp.concatenate([_jax_core(x, t), _jax_var(x, t)], axis=-1)


def torch_model(x: torch.Tensor, t, learned: bool = False) -> torch.Tensor:
  """diffusers-side model: x float32 [B, C, H, W], t a scalar timestep (int or 0-d tensor)."""
  tf = torch.as_tensor(t).to(torch.float32)
  out = torch.tanh(0.7 * x + 0.3 * torch.sin(x * (1.0 + tf / 1000.0))) * (0.8 + 0.2 * torch.cos(tf / 37.0))
  out = out + 0.1 * x * torch.cos(tf / 100.0)
  if learned:
    var = torch.tanh(0.5 * x + torch.sin(tf / 53.0))
    out = torch.cat([out, var], dim=1)  # diffusers splits learned variance along dim 1
  return out


# --------------------------------------------------------------------------------------------
# layout / metric helpers
# --------------------------------------------------------------------------------------------


def to_torch(a) -> torch.Tensor:
  """ddx [B, H, W, C] -> torch float32 [B, C, H, W]."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2))))


def from_torch(t: torch.Tensor) -> np.ndarray:
  """torch [B, C, H, W] -> numpy [B, H, W, C]."""
  return np.transpose(t.detach().cpu().numpy(), (0, 2, 3, 1))


def rel_err(ours, ref) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  if not (np.all(np.isfinite(ours)) and np.all(np.isfinite(ref))):
    return float("inf")
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def x_T(seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), SHAPE, jnp.float32)


def ddx_noise(key, i: int) -> np.ndarray:
  """Exactly the noise ddx.sample draws for model call i (see ddx/sampling.py)."""
  return np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32))


@contextlib.contextmanager
def patched_ddpm_noise(module=scheduling_ddpm):
  """Replace ``module.randn_tensor`` (called as ``randn_tensor(model_output.shape,
  generator=..., device=..., dtype=model_output.dtype)`` in DDPMScheduler.step, only when
  t > 0, and in EulerAncestralDiscreteScheduler.step) by a function returning ``box[0]``;
  the caller sets ``box[0]`` before each step."""
  box: list[Any] = [None]
  orig = module.randn_tensor

  def fake(shape, generator=None, device=None, dtype=None, layout=None):
    z = box[0]
    assert z is not None and tuple(z.shape) == tuple(shape), (None if z is None else z.shape, shape)
    box[0] = None  # each queued draw is consumed at most once
    return z.to(dtype=dtype)

  module.randn_tensor = fake
  try:
    yield box
  finally:
    module.randn_tensor = orig


# --------------------------------------------------------------------------------------------
# schedule construction
# --------------------------------------------------------------------------------------------


def sched_kwargs(schedule: str) -> dict:
  """ddx.schedules.make keyword arguments for a case's schedule name."""
  return dict(beta_start=SD_BETAS["beta_start"], beta_end=SD_BETAS["beta_end"]) if schedule == "scaled_linear" else {}


def diffusers_sched_kwargs(schedule: str, zero_snr: bool = False) -> dict:
  kw = dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule])
  if schedule == "scaled_linear":
    kw.update(SD_BETAS)
  if zero_snr:
    kw["rescale_betas_zero_snr"] = True
  return kw


def ddx_schedule(schedule: str, zero_snr: bool = False) -> ddx.Schedule:
  return ddx.schedules.make(schedule, T, rescale_zero_snr=zero_snr, **sched_kwargs(schedule))


_jit_models = {False: jax.jit(jax_model), True: jax.jit(jax_model_learned)}
_jit_step = jax.jit(lambda smp, state, out, i, z: smp.step(state, out, i, z))
_jit_input = jax.jit(lambda smp, state, i, z: smp.model_input(state, i, z))


def run_ddx(sampler, key, learned: bool = False) -> dict:
  """Run ``sampler`` twice: through ``ddx.sample`` (the jitted lax.scan driver: its final
  sample) and step by step in Python with the same per-call noise (the whole trajectory:
  ``state.x`` after every model call, which is what the diffusers loop returns per call)."""
  model = jax_model_learned if learned else jax_model
  k = key if sampler.stochastic else None
  final = np.asarray(ddx.sample(model, sampler, x_T(), k))
  state = sampler.init(x_T())
  traj = []
  for i in range(sampler.num_calls):
    z = jnp.asarray(ddx_noise(key, i)) if sampler.stochastic else None
    x_in, t = _jit_input(sampler, state, jnp.int32(i), z)
    out = _jit_models[learned](x_in, jnp.broadcast_to(t, (SHAPE[0],)))
    state = _jit_step(sampler, state, out, jnp.int32(i), z)
    traj.append(np.asarray(state.x))
  return dict(final=final, traj=traj)


def _ref_inputs(dtype):
  return to_torch(x_T()).to(dtype)


def _upcast_alphas(sch, schedule: str, zero_snr: bool = False, num_train: int = T):
  """Float64 reference mode: the same diffusers step code, run in float64 on ddx's exact
  float64 alphas_cumprod (a diagnostic separating diffusers' float32 arithmetic from ddx)."""
  ab = ddx.schedules.make(schedule, num_train, rescale_zero_snr=zero_snr, **sched_kwargs(schedule)).f64.alphas_cumprod
  sch.alphas_cumprod = torch.from_numpy(np.array(ab, np.float64))
  sch.one = torch.tensor(1.0, dtype=torch.float64)
  if hasattr(sch, "final_alpha_cumprod"):
    sch.final_alpha_cumprod = (
      torch.tensor(1.0, dtype=torch.float64) if sch.config.set_alpha_to_one else sch.alphas_cumprod[0]
    )


def _case(defaults: dict, changes: dict) -> dict:
  """``defaults`` updated with ``changes``, whose keys must all be known."""
  unknown = set(changes) - set(defaults)
  assert not unknown, unknown
  return {**defaults, **changes}


# --------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------

DDIM_DEFAULTS = dict(
  schedule="linear",
  spacing="leading",
  steps_offset=0,
  S=20,
  set_alpha_to_one=True,
  prediction="eps",
  clip_sample=False,
  thresholding=False,
  threshold_max=1.5,
  use_clipped_model_output=False,
  eta=0.0,
  zero_snr=False,
)


def ddim_case(**kw) -> dict:
  return _case(DDIM_DEFAULTS, kw)


def ddim_reference(c: dict, key, dtype=torch.float32) -> list:
  sch = DDIMScheduler(
    **diffusers_sched_kwargs(c["schedule"], c["zero_snr"]),
    timestep_spacing=c["spacing"],
    steps_offset=c["steps_offset"],
    set_alpha_to_one=c["set_alpha_to_one"],
    prediction_type=DIFFUSERS_PREDICTION[c["prediction"]],
    clip_sample=c["clip_sample"],
    thresholding=c["thresholding"],
    sample_max_value=c["threshold_max"],
  )
  if dtype == torch.float64:
    _upcast_alphas(sch, c["schedule"], c["zero_snr"])
  sch.set_timesteps(c["S"])
  x = _ref_inputs(dtype)
  traj = []
  for i, t in enumerate(sch.timesteps):
    kw = {}
    if c["eta"] > 0:
      kw["variance_noise"] = to_torch(ddx_noise(key, i)).to(dtype)
    x = sch.step(
      torch_model(x, t), t, x, eta=c["eta"], use_clipped_model_output=c["use_clipped_model_output"], **kw
    ).prev_sample
    traj.append(from_torch(x))
  return traj


def ddim_ddx(c: dict, key) -> dict:
  sampler = ddx.samplers.make(
    "ddim",
    ddx_schedule(c["schedule"], c["zero_snr"]),
    c["S"],
    eta=c["eta"],
    spacing=c["spacing"],
    steps_offset=c["steps_offset"],
    set_alpha_to_one=c["set_alpha_to_one"],
    prediction=c["prediction"],
    clip_sample=c["clip_sample"],
    thresholding=c["thresholding"],
    threshold_max=c["threshold_max"],
    use_clipped_model_output=c["use_clipped_model_output"],
  )
  return run_ddx(sampler, key)


# --------------------------------------------------------------------------------------------
# DDPM
# --------------------------------------------------------------------------------------------

DDPM_DEFAULTS = dict(
  schedule="linear",
  variance="fixed_small",
  spacing="leading",
  steps_offset=0,
  S=20,
  prediction="eps",
  clip_sample=True,
  thresholding=False,
  threshold_max=1.5,
  T=T,
)


def ddpm_case(**kw) -> dict:
  return _case(DDPM_DEFAULTS, kw)


def _ddpm_train_kwargs(c):
  kw = diffusers_sched_kwargs(c["schedule"])
  kw["num_train_timesteps"] = c["T"]
  return kw


def ddpm_reference(c: dict, key, dtype=torch.float32) -> list:
  learned = c["variance"] == "learned_range"
  sch = DDPMScheduler(
    **_ddpm_train_kwargs(c),
    variance_type=c["variance"],
    timestep_spacing=c["spacing"],
    steps_offset=c["steps_offset"],
    prediction_type=DIFFUSERS_PREDICTION[c["prediction"]],
    clip_sample=c["clip_sample"],
    thresholding=c["thresholding"],
    sample_max_value=c["threshold_max"],
  )
  if dtype == torch.float64:
    _upcast_alphas(sch, c["schedule"], num_train=c["T"])
  sch.set_timesteps(c["S"])
  x = _ref_inputs(dtype)
  traj = []
  with patched_ddpm_noise() as box:
    for i, t in enumerate(sch.timesteps):
      box[0] = to_torch(ddx_noise(key, i)).to(dtype)
      x = sch.step(torch_model(x, t, learned=learned), t, x).prev_sample
      traj.append(from_torch(x))
  return traj


def ddpm_ddx(c: dict, key) -> dict:
  sched = ddx.schedules.make(c["schedule"], c["T"], **sched_kwargs(c["schedule"]))
  sampler = ddx.samplers.make(
    "ddpm",
    sched,
    c["S"],
    variance=c["variance"],
    spacing=c["spacing"],
    steps_offset=c["steps_offset"],
    prediction=c["prediction"],
    clip_sample=c["clip_sample"],
    thresholding=c["thresholding"],
    threshold_max=c["threshold_max"],
  )
  return run_ddx(sampler, key, learned=c["variance"] == "learned_range")


# --------------------------------------------------------------------------------------------
# PLMS = PNDMScheduler(skip_prk_steps=True)
# --------------------------------------------------------------------------------------------

PLMS_DEFAULTS = dict(
  schedule="scaled_linear", spacing="leading", steps_offset=1, S=20, set_alpha_to_one=False, prediction="eps"
)


def plms_case(**kw) -> dict:
  return _case(PLMS_DEFAULTS, kw)


def plms_scheduler(c: dict, dtype=torch.float32) -> PNDMScheduler:
  sch = PNDMScheduler(
    **diffusers_sched_kwargs(c["schedule"]),
    skip_prk_steps=True,
    timestep_spacing=c["spacing"],
    steps_offset=c["steps_offset"],
    set_alpha_to_one=c["set_alpha_to_one"],
    prediction_type=DIFFUSERS_PREDICTION[c["prediction"]],
  )
  if dtype == torch.float64:
    _upcast_alphas(sch, c["schedule"])
  sch.set_timesteps(c["S"])
  return sch


def plms_reference(c: dict, key=None, dtype=torch.float32) -> list:
  sch = plms_scheduler(c, dtype)
  x = _ref_inputs(dtype)
  traj = []
  for t in sch.timesteps:
    x = sch.step(torch_model(x, t), t, x).prev_sample
    traj.append(from_torch(x))
  return traj


def plms_sampler(c: dict):
  return ddx.samplers.make(
    "plms",
    ddx_schedule(c["schedule"]),
    c["S"],
    spacing=c["spacing"],
    steps_offset=c["steps_offset"],
    set_alpha_to_one=c["set_alpha_to_one"],
    prediction=c["prediction"],
  )


def plms_ddx(c: dict, key=None) -> dict:
  return run_ddx(plms_sampler(c), None)


# --------------------------------------------------------------------------------------------
# DPM-Solver++ = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")
# --------------------------------------------------------------------------------------------

DPM_DEFAULTS = dict(
  schedule="scaled_linear",
  spacing="linspace",
  S=20,
  solver_order=2,
  solver_type="midpoint",
  final_sigmas_type="zero",
  lower_order_final=True,
  euler_at_final=False,
  prediction="eps",
  thresholding=False,
  threshold_max=1.5,
  timesteps=None,
  algorithm="ode",
  sigmas=None,
)


def dpm_case(**kw) -> dict:
  return _case(DPM_DEFAULTS, kw)


def _float_sigma_timesteps(sch):
  """diffusers rounds t(σ) to an integer on the Karras grid and truncates it on the others;
  ddx gives the model the exact t(σ) (docs/samplers.md §7): so does this reference."""
  table = np.log(((1 - sch.alphas_cumprod) / sch.alphas_cumprod).numpy() ** 0.5)
  t = [sch._sigma_to_t(s, table) for s in sch.sigmas[:-1].numpy()]
  sch.timesteps = torch.from_numpy(np.asarray(t, np.float32))


def dpm_scheduler(c: dict) -> DPMSolverMultistepScheduler:
  sch = DPMSolverMultistepScheduler(
    **diffusers_sched_kwargs(c["schedule"]),
    algorithm_type={"ode": "dpmsolver++", "sde": "sde-dpmsolver++"}[c["algorithm"]],
    solver_order=c["solver_order"],
    solver_type=c["solver_type"],
    final_sigmas_type=c["final_sigmas_type"],
    lower_order_final=c["lower_order_final"],
    euler_at_final=c["euler_at_final"],
    timestep_spacing=c["spacing"],
    prediction_type=DIFFUSERS_PREDICTION[c["prediction"]],
    thresholding=c["thresholding"],
    sample_max_value=c["threshold_max"],
    **({_SIGMA_GRID_FLAGS[c["sigmas"]]: True} if c["sigmas"] else {}),
  )
  if c["timesteps"] is not None:
    sch.set_timesteps(timesteps=list(c["timesteps"]))
  else:
    sch.set_timesteps(c["S"])
  if c["sigmas"] is not None:
    _float_sigma_timesteps(sch)
  return sch


def dpm_reference(c: dict, key=None, dtype=torch.float32) -> list:
  # No float64 mode: DPMSolverMultistepScheduler stores sigmas as float32 and casts the
  # sample to float32 inside step().
  assert dtype == torch.float32, "DPMSolverMultistepScheduler computes in float32 only"
  sch = dpm_scheduler(c)
  x = _ref_inputs(dtype)
  traj = []
  for i, t in enumerate(sch.timesteps):
    kw = {"variance_noise": to_torch(ddx_noise(key, i))} if c["algorithm"] == "sde" else {}
    x = sch.step(torch_model(x, t), t, x, **kw).prev_sample
    traj.append(from_torch(x))
  return traj


def dpm_sampler(c: dict):
  return ddx.samplers.make(
    "dpm_solver++",
    ddx_schedule(c["schedule"]),
    c["S"],
    solver_order=c["solver_order"],
    solver_type=c["solver_type"],
    final_sigma=c["final_sigmas_type"],
    lower_order_final=c["lower_order_final"],
    euler_at_final=c["euler_at_final"],
    spacing=c["spacing"],
    timesteps=c["timesteps"],
    prediction=c["prediction"],
    thresholding=c["thresholding"],
    threshold_max=c["threshold_max"],
    algorithm=c["algorithm"],
    sigmas=c["sigmas"],
  )


def dpm_ddx(c: dict, key=None) -> dict:
  return run_ddx(dpm_sampler(c), key)


# --------------------------------------------------------------------------------------------
# UniPC = UniPCMultistepScheduler(predict_x0=True)
# --------------------------------------------------------------------------------------------

UNIPC_DEFAULTS = dict(
  schedule="scaled_linear",
  spacing="linspace",
  S=20,
  solver_order=2,
  solver_type="bh2",
  disable_corrector=(),
  lower_order_final=True,
  final_sigmas_type="zero",
  prediction="eps",
  thresholding=False,
  threshold_max=1.5,
  sigmas=None,
)


def unipc_case(**kw) -> dict:
  return _case(UNIPC_DEFAULTS, kw)


def unipc_reference(c: dict, key=None, dtype=torch.float32) -> list:
  assert dtype == torch.float32
  sch = UniPCMultistepScheduler(
    **diffusers_sched_kwargs(c["schedule"]),
    solver_order=c["solver_order"],
    solver_type=c["solver_type"],
    disable_corrector=list(c["disable_corrector"]),
    lower_order_final=c["lower_order_final"],
    final_sigmas_type=c["final_sigmas_type"],
    timestep_spacing=c["spacing"],
    prediction_type=DIFFUSERS_PREDICTION[c["prediction"]],
    thresholding=c["thresholding"],
    sample_max_value=c["threshold_max"],
    **({_SIGMA_GRID_FLAGS[c["sigmas"]]: True} if c["sigmas"] else {}),
  )
  sch.set_timesteps(c["S"])
  if c["sigmas"] is not None:
    _float_sigma_timesteps(sch)
  x = _ref_inputs(dtype)
  traj = []
  for t in sch.timesteps:
    x = sch.step(torch_model(x, t), t, x).prev_sample
    traj.append(from_torch(x))
  return traj


def unipc_sampler(c: dict):
  return ddx.samplers.make(
    "unipc",
    ddx_schedule(c["schedule"]),
    c["S"],
    solver_order=c["solver_order"],
    solver_type=c["solver_type"],
    disable_corrector=c["disable_corrector"],
    lower_order_final=c["lower_order_final"],
    final_sigma=c["final_sigmas_type"],
    spacing=c["spacing"],
    prediction=c["prediction"],
    thresholding=c["thresholding"],
    threshold_max=c["threshold_max"],
    sigmas=c["sigmas"],
  )


def unipc_ddx(c: dict, key=None) -> dict:
  return run_ddx(unipc_sampler(c), None)


# --------------------------------------------------------------------------------------------
# σ-space samplers = EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete / LMSDiscrete
# --------------------------------------------------------------------------------------------

SIGMA_DEFAULTS = dict(
  schedule="scaled_linear",
  spacing="linspace",
  steps_offset=0,
  S=20,
  sigmas=None,
  final_sigma="zero",
  prediction="eps",
  zero_snr=False,
)
SIGMA_SCHEDULERS = {
  "euler": EulerDiscreteScheduler,
  "euler_ancestral": EulerAncestralDiscreteScheduler,
  "heun": HeunDiscreteScheduler,
  "lms": LMSDiscreteScheduler,
}
_SIGMA_GRID_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def sigma_case(**kw) -> dict:
  return _case(SIGMA_DEFAULTS, kw)


def sigma_reference(kind: str, c: dict, key, dtype=torch.float32) -> list:
  """The diffusers scheduler driven as its pipelines do (scale_model_input, then step), from
  x_T scaled by sqrt(σ_max² + 1) (ddx's choice; diffusers' init_noise_sigma is σ_max for
  linspace / trailing spacing, docs/samplers.md §7), with ddx's noise injected.

  ``dtype=torch.float64`` (Heun and LMS only: Euler's step casts to float32) runs the same
  code in float64 on ddx's exact alphas; its σ tables stay float32-rounded, as ddx's are."""
  assert dtype == torch.float32 or kind in ("heun", "lms")
  kw = diffusers_sched_kwargs(c["schedule"], c["zero_snr"])
  if c["schedule"] == "linear":  # HeunDiscreteScheduler's own defaults are SD's endpoints
    kw.update(beta_start=1e-4, beta_end=0.02)
  kw.update(timestep_spacing=c["spacing"], steps_offset=c["steps_offset"])
  kw["prediction_type"] = DIFFUSERS_PREDICTION[c["prediction"]]
  if c["sigmas"] is not None:
    kw[_SIGMA_GRID_FLAGS[c["sigmas"]]] = True
  if c["final_sigma"] != "zero":
    kw["final_sigmas_type"] = c["final_sigma"]
  sch = SIGMA_SCHEDULERS[kind](**kw)
  if dtype == torch.float64:
    ab = ddx_schedule(c["schedule"], c["zero_snr"]).f64.alphas_cumprod
    sch.alphas_cumprod = torch.from_numpy(np.where(ab <= 0, 2.0**-24, ab))
  sch.set_timesteps(c["S"])
  sch.sigmas = sch.sigmas.to(dtype)
  x = _ref_inputs(dtype) * float(np.sqrt(float(sch.sigmas.max()) ** 2 + 1.0))
  traj = []
  with patched_ddpm_noise(scheduling_euler_ancestral_discrete) as box:
    for i, t in enumerate(sch.timesteps):
      box[0] = to_torch(ddx_noise(key, i)).to(dtype) if kind == "euler_ancestral" else None
      out = torch_model(sch.scale_model_input(x, t), t).to(dtype)
      x = sch.step(out, t, x).prev_sample
      traj.append(from_torch(x))
  return traj


def sigma_sampler(kind: str, c: dict):
  kw = dict(spacing=c["spacing"], steps_offset=c["steps_offset"], prediction=c["prediction"])
  kw.update(sigmas=c["sigmas"], final_sigma=c["final_sigma"])
  return ddx.samplers.make(kind, ddx_schedule(c["schedule"], c["zero_snr"]), c["S"], **kw)


def _sigma_runners(kind):
  return (
    lambda c, key=None: run_ddx(sigma_sampler(kind, c), key),
    lambda c, key=None, dtype=torch.float32: sigma_reference(kind, c, key, dtype),
  )


# --------------------------------------------------------------------------------------------
# rectified flow = FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler
# --------------------------------------------------------------------------------------------

FLOW_DEFAULTS = dict(S=28, shift=1.0, T=T)
FLOW_SCHEDULERS = {"flow_euler": FlowMatchEulerDiscreteScheduler, "flow_heun": FlowMatchHeunDiscreteScheduler}


def flow_case(**kw) -> dict:
  return _case(FLOW_DEFAULTS, kw)


def flow_reference(kind: str, c: dict, key=None, dtype=torch.float32) -> list:
  sch = FLOW_SCHEDULERS[kind](num_train_timesteps=c["T"], shift=c["shift"])
  sch.set_timesteps(c["S"])
  sch.sigmas = sch.sigmas.to(dtype)  # float64: the arithmetic only (the σ stay float32-rounded)
  x = _ref_inputs(dtype)
  traj = []
  for t in sch.timesteps:
    x = sch.step(torch_model(x, t).to(dtype), t, x).prev_sample
    traj.append(from_torch(x))
  return traj


def _flow_runners(kind):
  return (
    lambda c, key=None: run_ddx(ddx.samplers.make(kind, None, c["S"], shift=c["shift"], num_train=c["T"]), None),
    lambda c, key=None, dtype=torch.float32: flow_reference(kind, c, key, dtype),
  )


# --------------------------------------------------------------------------------------------
# EDM = EDMEulerScheduler, on ddx.edm.precondition's denoiser of the same network
# --------------------------------------------------------------------------------------------

EDM_DEFAULTS = dict(S=18, schedule="karras", final_sigma="zero", sigma_min=0.002, sigma_max=80.0, rho=7.0)


def edm_case(**kw) -> dict:
  return _case(EDM_DEFAULTS, kw)


def edm_reference(c: dict, key=None, dtype=torch.float32) -> list:
  assert dtype == torch.float32
  sch = EDMEulerScheduler(
    sigma_min=c["sigma_min"],
    sigma_max=c["sigma_max"],
    rho=c["rho"],
    sigma_schedule=c["schedule"],
    final_sigmas_type=c["final_sigma"],
  )
  sch.set_timesteps(c["S"])
  x = _ref_inputs(dtype) * sch.init_noise_sigma
  traj = []
  for t in sch.timesteps:
    x = sch.step(torch_model(sch.scale_model_input(x, t), t), t, x).prev_sample
    traj.append(from_torch(x))
  return traj


def edm_ddx(c: dict, key=None) -> dict:
  smp = ddx.samplers.make("edm_euler", None, c["S"], **{k: v for k, v in c.items() if k != "S"})
  final = np.asarray(ddx.sample(ddx.edm.precondition(jax_model, 0.5), smp, x_T()))
  # the step-by-step run of run_ddx, with the preconditioned model
  state = smp.init(x_T())
  traj = []
  model = jax.jit(ddx.edm.precondition(jax_model, 0.5))
  for i in range(smp.num_calls):
    x_in, t = _jit_input(smp, state, jnp.int32(i), None)
    state = _jit_step(smp, state, model(x_in, jnp.broadcast_to(t, (SHAPE[0],))), jnp.int32(i), None)
    traj.append(np.asarray(state.x))
  return dict(final=final, traj=traj)


RUNNERS = {
  "ddim": (ddim_ddx, ddim_reference),
  "ddpm": (ddpm_ddx, ddpm_reference),
  "plms": (plms_ddx, plms_reference),
  "dpm_solver++": (dpm_ddx, dpm_reference),
  "unipc": (unipc_ddx, unipc_reference),
  **{kind: _sigma_runners(kind) for kind in SIGMA_SCHEDULERS},
  **{kind: _flow_runners(kind) for kind in FLOW_SCHEDULERS},
  "edm_euler": (edm_ddx, edm_reference),
}


def compare(ours: dict, ref: list) -> dict:
  """Errors of a ddx run against a reference trajectory: ``final`` (ddx.sample's output vs the
  reference's last sample) and ``traj`` (max over model calls of the per-call relative
  error of the step-by-step ddx run)."""
  assert len(ours["traj"]) == len(ref), (len(ours["traj"]), len(ref))
  return dict(
    final=rel_err(ours["final"], ref[-1]),
    traj=max(rel_err(a, b) for a, b in zip(ours["traj"], ref)),
    scan_vs_steps=rel_err(ours["final"], ours["traj"][-1]),
  )


def measure(kind: str, case: dict, seed: int = 1, f64: bool = False) -> dict:
  """Run one case through ddx and diffusers with the same noise (float32 reference, and with
  ``f64`` also the float64-evaluated reference under key ``f64``)."""
  key = jax.random.key(seed)
  ours_fn, ref_fn = RUNNERS[kind]
  ours = ours_fn(case, key)
  res = compare(ours, ref_fn(case, key))
  if f64:
    res["f64"] = compare(ours, ref_fn(case, key, torch.float64))
  return res


def case_id(case: dict, defaults: dict) -> str:
  """Short id listing the knobs that differ from the sampler's defaults."""
  parts = [f"{k}={v}" for k, v in case.items() if defaults.get(k, object()) != v]
  return ",".join(parts) or "defaults"


# --------------------------------------------------------------------------------------------
# The knob grid. Each entry: (kind, group, case, tol) where tol bounds the error against stock
# (float32) diffusers; every DDIM / DDPM / PLMS case is additionally held to TOL against the
# float64-evaluated reference (the same diffusers code on float64 alphas and arithmetic).
# --------------------------------------------------------------------------------------------

# diffusers' DDPMScheduler computes beta' = 1 - a/a' in float32: on a full chain (S = T) a/a'
# is within ~1e-4 of 1 near t = 0, so beta' (and the posterior coefficients built from it)
# carry up to ~5e-4 relative float32 cancellation error per step. Measured over the whole
# trajectory: stock diffusers vs its own float64 evaluation 3e-5..9e-5 (T = S = 100 and
# T = S = 1000), while ddx (float64 host coefficients) stays within 1.5e-6 of the float64
# evaluation. Hence 2e-4 against float32 diffusers for the full chains (1e-5 against float64).
TOL_DDPM_FULL_CHAIN_F32 = 2e-4


# The σ-space samplers carry x_σ = x0 + σ eps, of magnitude σ_max at the start: in float32 that
# costs ~σ_max 2^-24 absolute on every sample, in ddx and in diffusers alike. The cosine
# schedule has σ_max ≈ 2.0e4: with x0 / v prediction, Heun there is 3e-2 / 9e-3 (ddx) and
# 5e-2 / 1e-2 (diffusers) from the float64 evaluation of the same diffusers code, LMS 3e-4
# (both); so cosine is compared with eps prediction only. Zero-SNR's clamp gives σ_max = 4096:
# Euler there differs from diffusers by 6e-5 (tolerance 1e-4). Measured 2026-12-08.
# Where diffusers divides a difference by a small σ (Heun's second call at σ(t=0) = 0.029,
# x0 prediction in Heun / LMS), its float32 result is 2e-5..4e-5 from its own float64
# evaluation while ddx stays within 2e-6 of it (test_sigma_samplers_closer_to_float64): ddx
# writes the derivative without that cancellation (ddx/samplers/sigmas.py, ``derivative``).
TOL_SIGMA_DIFFUSERS_F32 = 5e-5
SIGMA_F64_CASES = [
  ("heun", sigma_case(S=2)),
  ("heun", sigma_case(schedule="linear", prediction="x0", S=10)),
  ("lms", sigma_case(schedule="linear", prediction="x0", S=10)),
  ("heun", sigma_case(sigmas="karras", prediction="v", S=10)),
  ("lms", sigma_case(sigmas="exponential", spacing="leading", steps_offset=1, S=10)),
  ("flow_heun", {**FLOW_DEFAULTS, "S": 2}),
  ("flow_heun", {**FLOW_DEFAULTS, "S": 4, "shift": 3.0}),
]


def _cases():
  out = []

  def add(kind, group, case, tol=TOL):
    if not any(k == kind and c == case for k, _, c, _ in out):  # the sub-grids overlap
      out.append((kind, group, case, tol))

  # ---- DDIM ----
  g = "schedule x spacing/offset x set_alpha_to_one"
  for schedule in ("linear", "scaled_linear", "cosine"):
    for spacing, off in (("leading", 0), ("leading", 1), ("trailing", 0)):
      for one in (True, False):
        add("ddim", g, ddim_case(schedule=schedule, spacing=spacing, steps_offset=off, set_alpha_to_one=one))
  g = "prediction x clip/threshold x use_clipped_model_output"
  for pred in ("eps", "x0", "v"):
    for clip, thr, ucmo in (
      (False, False, False),
      (True, False, False),
      (True, False, True),
      (False, True, False),
      (False, True, True),
    ):
      add(
        "ddim",
        g,
        ddim_case(
          prediction=pred,
          clip_sample=clip,
          thresholding=thr,
          use_clipped_model_output=ucmo,
          steps_offset=1,
          set_alpha_to_one=False,
          S=10,
        ),
      )
  g = "eta 0.5 / 1 (injected variance_noise)"
  for eta in (0.5, 1.0):
    add("ddim", g, ddim_case(eta=eta, clip_sample=True))
    add("ddim", g, ddim_case(eta=eta, schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False))
    add("ddim", g, ddim_case(eta=eta, schedule="cosine", spacing="trailing", S=25))
    add("ddim", g, ddim_case(eta=eta, prediction="x0", clip_sample=True, use_clipped_model_output=True, S=10))
    add("ddim", g, ddim_case(eta=eta, prediction="v", thresholding=True, set_alpha_to_one=False, S=10))
  # zero terminal SNR (ab[T-1] = 0): v-prediction with trailing spacing (starts at T-1).
  # eta = 1 there is tested separately (test_ddim_zero_snr_eta_one): diffusers NaNs.
  g = "zero-SNR rescale, v, trailing"
  for S, one, eta, clip in (
    (10, True, 0.0, False),
    (25, False, 0.0, False),
    (25, True, 0.5, False),
    (10, False, 0.5, True),
  ):
    add(
      "ddim",
      g,
      ddim_case(
        schedule="scaled_linear",
        zero_snr=True,
        prediction="v",
        spacing="trailing",
        S=S,
        set_alpha_to_one=one,
        eta=eta,
        clip_sample=clip,
      ),
    )
  g = "S sweep"
  for S in (1, 2, 3, 7, 50, 100):
    add("ddim", g, ddim_case(S=S, steps_offset=S % 2, set_alpha_to_one=bool(S % 3)))

  # ---- DDPM (injected noise through the patched randn_tensor) ----
  g = "variance x spacing/offset (respaced S < T)"
  for variance in ("fixed_small", "fixed_large", "learned_range"):
    for spacing, off, S in (
      ("leading", 0, 25),
      ("leading", 1, 25),
      ("trailing", 0, 25),
      ("trailing", 0, 13),
      ("linspace", 0, 10),
    ):
      add("ddpm", g, ddpm_case(variance=variance, spacing=spacing, steps_offset=off, S=S))
  g = "prediction x clip/threshold"
  for pred in ("eps", "x0", "v"):
    for clip, thr in ((False, False), (True, False), (False, True)):
      add("ddpm", g, ddpm_case(prediction=pred, clip_sample=clip, thresholding=thr))
  add("ddpm", g, ddpm_case(prediction="v", variance="learned_range", steps_offset=1, clip_sample=False))
  g = "schedule (scaled_linear, cosine, sigmoid)"
  for schedule in ("scaled_linear", "cosine", "sigmoid"):
    for variance in ("fixed_small", "fixed_large"):
      add("ddpm", g, ddpm_case(schedule=schedule, variance=variance, S=25))
  g = "full chain S = T (f32 tol 2e-4, see TOL_DDPM_FULL_CHAIN_F32)"
  for variance in ("fixed_small", "fixed_large", "learned_range"):
    add("ddpm", g, ddpm_case(T=100, S=100, variance=variance), TOL_DDPM_FULL_CHAIN_F32)
  add(
    "ddpm",
    g,
    ddpm_case(T=100, S=100, variance="fixed_large", prediction="v", clip_sample=False),
    TOL_DDPM_FULL_CHAIN_F32,
  )
  add("ddpm", g, ddpm_case(S=1000), TOL_DDPM_FULL_CHAIN_F32)

  # ---- PLMS = PNDM(skip_prk_steps=True); eps here, v / x0: see test_plms_v_x0_documented ----
  g = "schedule x steps_offset x set_alpha_to_one"
  for schedule in ("linear", "scaled_linear"):
    for off in (0, 1):
      for one in (False, True):
        add("plms", g, plms_case(schedule=schedule, steps_offset=off, set_alpha_to_one=one))
  g = "S in {1..5, 50} (S=1: single Euler step)"
  for S in (1, 2, 3, 4, 5, 50):
    add("plms", g, plms_case(S=S))
  for S in (1, 3, 5):
    add("plms", g, plms_case(S=S, schedule="linear", steps_offset=0, set_alpha_to_one=True))
  g = "trailing (S divides T), cosine"
  add("plms", g, plms_case(spacing="trailing", steps_offset=0, S=25))
  add("plms", g, plms_case(schedule="cosine", steps_offset=0))

  # ---- DPM-Solver++ ----
  g = "order x solver_type x final_sigmas_type x lower_order_final / euler_at_final"
  for final in ("zero", "sigma_min"):
    add("dpm_solver++", g, dpm_case(solver_order=1, final_sigmas_type=final, S=10))
    for st in ("midpoint", "heun"):
      for lof in (True, False):
        for S in (10, 20):
          add("dpm_solver++", g, dpm_case(solver_type=st, final_sigmas_type=final, lower_order_final=lof, S=S))
  for S in (10, 20):
    add("dpm_solver++", g, dpm_case(final_sigmas_type="sigma_min", euler_at_final=True, S=S))
  g = "spacing x S in {5, 10, 20, 25}"
  for spacing in ("linspace", "leading", "trailing"):
    for S in (5, 10, 20, 25):
      add("dpm_solver++", g, dpm_case(spacing=spacing, S=S))
  g = "prediction x thresholding"
  for pred in ("eps", "x0", "v"):
    for thr in (False, True):
      add("dpm_solver++", g, dpm_case(prediction=pred, thresholding=thr, S=10))
  g = "schedule (linear, cosine) x final sigma"
  for schedule in ("linear", "cosine"):
    for final in ("zero", "sigma_min"):
      add("dpm_solver++", g, dpm_case(schedule=schedule, final_sigmas_type=final))
  g = "third order (ODE) x final sigma x lower_order_final x S"
  for final in ("zero", "sigma_min"):
    for lof in (True, False):
      for S in (5, 10, 20):
        add("dpm_solver++", g, dpm_case(solver_order=3, final_sigmas_type=final, lower_order_final=lof, S=S))
  add("dpm_solver++", g, dpm_case(solver_order=3, prediction="v", S=12))
  g = "SDE (injected variance_noise) x order 1, 2 x solver_type"
  for order, st in ((1, "midpoint"), (2, "midpoint"), (2, "heun")):
    for S in (10, 20):
      add("dpm_solver++", g, dpm_case(algorithm="sde", solver_order=order, solver_type=st, S=S))
  add("dpm_solver++", g, dpm_case(algorithm="sde", final_sigmas_type="sigma_min", S=10))
  add("dpm_solver++", g, dpm_case(algorithm="sde", prediction="v", spacing="trailing", S=10))
  g = "sigmas (karras / exponential / beta) x order x ODE/SDE"
  for grid in ("karras", "exponential", "beta"):
    for order in (2, 3):
      add("dpm_solver++", g, dpm_case(sigmas=grid, solver_order=order, S=10))
    add("dpm_solver++", g, dpm_case(sigmas=grid, algorithm="sde", S=20))
  add("dpm_solver++", g, dpm_case(sigmas="karras", prediction="v", final_sigmas_type="sigma_min", S=25))

  # ---- UniPC (bh1 ends at sigma_min: with a final σ of 0 diffusers' bh1 returns NaN,
  # test_unipc_bh1_final_zero) ----
  g = "order x solver_type x S"
  for order in (1, 2, 3):
    for st, final in (("bh2", "zero"), ("bh1", "sigma_min")):
      for S in (5, 10, 20):
        add("unipc", g, unipc_case(solver_order=order, solver_type=st, final_sigmas_type=final, S=S))
  g = "corrector off / partly, lower_order_final off (sigma_min)"
  add("unipc", g, unipc_case(disable_corrector=tuple(range(20))))
  add("unipc", g, unipc_case(disable_corrector=(0, 3, 7), solver_order=3))
  for order in (2, 3):
    add("unipc", g, unipc_case(solver_order=order, lower_order_final=False, final_sigmas_type="sigma_min"))
  g = "prediction x thresholding, spacing, schedule"
  for pred in ("eps", "x0", "v"):
    for thr in (False, True):
      add("unipc", g, unipc_case(prediction=pred, thresholding=thr, solver_order=3, S=12))
  for spacing in ("leading", "trailing"):
    add("unipc", g, unipc_case(spacing=spacing, solver_order=3))
  for schedule in ("linear", "cosine"):
    add("unipc", g, unipc_case(schedule=schedule, solver_order=3))
  g = "sigmas (karras / exponential / beta)"
  for grid in ("karras", "exponential", "beta"):
    add("unipc", g, unipc_case(sigmas=grid, solver_order=3, S=10))
  add("unipc", g, unipc_case(sigmas="karras", S=25, prediction="v"))

  # ---- σ-space samplers (diffusers supports: final_sigmas_type and zero-SNR only in Euler,
  # zero-SNR in Euler ancestral, the re-spaced grids in all but Euler ancestral; Euler
  # ancestral has no x0 prediction) ----
  for kind in SIGMA_SCHEDULERS:
    g = "spacing x grid x S"
    for spacing, off in (("linspace", 0), ("leading", 1), ("trailing", 0)):
      for grid in (None, "karras", "exponential", "beta"):
        if grid and kind == "euler_ancestral":
          continue
        for S in (4, 20) if grid in (None, "karras") else (10,):
          add(kind, g, sigma_case(spacing=spacing, steps_offset=off, sigmas=grid, S=S))
    g = "prediction x schedule (cosine: eps only, see TOL_SIGMA_DIFFUSERS_F32)"
    for pred in ("eps", "v") if kind == "euler_ancestral" else ("eps", "x0", "v"):
      for schedule in ("scaled_linear", "linear"):
        tol = TOL_SIGMA_DIFFUSERS_F32 if (kind in ("heun", "lms") and pred == "x0" and schedule == "linear") else TOL
        add(kind, g, sigma_case(prediction=pred, schedule=schedule, S=10), tol)
    add(kind, g, sigma_case(schedule="cosine", S=10), 2e-5)
    g = "S = 1, 2"
    for S in (1, 2):
      add(kind, g, sigma_case(S=S), TOL_SIGMA_DIFFUSERS_F32 if kind == "heun" else TOL)
  for kind in ("euler", "euler_ancestral"):
    g = "zero-SNR rescale, v, trailing (tol 1e-4: σ_max = 4096, see TOL_SIGMA_DIFFUSERS_F32)"
    add(kind, g, sigma_case(zero_snr=True, prediction="v", spacing="trailing", S=10), 1e-4)
  g = "final sigma_min"
  for grid in (None, "karras"):
    add("euler", g, sigma_case(final_sigma="sigma_min", sigmas=grid, S=10))

  # ---- rectified flow ----
  for kind in FLOW_SCHEDULERS:
    g = "S x shift (SD3: 3), T"
    for S in (28, 1, 2, 4, 10):
      for shift in (1.0, 3.0):
        # Heun's second call at σ = s(1/T) divides by it in diffusers (TOL_SIGMA_DIFFUSERS_F32)
        add(kind, g, flow_case(S=S, shift=shift), TOL_SIGMA_DIFFUSERS_F32 if kind == "flow_heun" else TOL)
    add(kind, g, flow_case(S=10, shift=1.5, T=100))

  # ---- EDM (S = 1 on the exponential grid: test_edm_single_exponential_step) ----
  # S <= 2 jumps from x ~ σ_max = 80 to O(1) in one or two float32 steps, cancelling
  # ~80 2^-24 per operation on both sides: 4.6e-5 measured, tolerance 1e-4 there.
  g = "S x schedule x final sigma, σ range, ρ"
  for S in (18, 2, 4, 40):
    for sched in ("karras", "exponential"):
      for final in ("zero", "sigma_min"):
        add("edm_euler", g, edm_case(S=S, schedule=sched, final_sigma=final), 1e-4 if S <= 2 else TOL)
  add("edm_euler", g, edm_case(S=1), 1e-4)
  add("edm_euler", g, edm_case(S=10, sigma_min=0.02, sigma_max=20.0, rho=5.0))
  return out


DEFAULTS = {
  "ddim": DDIM_DEFAULTS,
  "ddpm": DDPM_DEFAULTS,
  "plms": PLMS_DEFAULTS,
  "dpm_solver++": DPM_DEFAULTS,
  "unipc": UNIPC_DEFAULTS,
  **{kind: SIGMA_DEFAULTS for kind in SIGMA_SCHEDULERS},
  **{kind: FLOW_DEFAULTS for kind in FLOW_SCHEDULERS},
  "edm_euler": EDM_DEFAULTS,
}
CASES = _cases()
HAS_F64 = ("ddim", "ddpm", "plms")  # DPMSolverMultistepScheduler computes in float32 only


# --------------------------------------------------------------------------------------------
# Documented ddx behaviour where diffusers differs on purpose (docs/samplers.md §7)
# --------------------------------------------------------------------------------------------


def plms_converted_reference(c: dict, dtype=torch.float32) -> list:
  """ddx PLMS with v / x0 prediction converts each output to eps at its own evaluation point
  (x, t) before the multistep combination (ddx/samplers/plms.py docstring). Reference: the
  stock PNDMScheduler in epsilon mode driven by that converted model, using diffusers' own
  alphas_cumprod[t]."""
  sch = plms_scheduler(dict(c, prediction="eps"), dtype)
  ab = sch.alphas_cumprod
  x = _ref_inputs(dtype)
  traj = []
  for t in sch.timesteps:
    out, a = torch_model(x, t), ab[t]
    if c["prediction"] == "v":
      eps = a**0.5 * out + (1 - a) ** 0.5 * x
    elif c["prediction"] == "x0":
      eps = (x - a**0.5 * out) / (1 - a) ** 0.5
    else:
      eps = out
    x = sch.step(eps, t, x).prev_sample
    traj.append(from_torch(x))
  return traj


def ddim_via_dpm1_reference(c: dict) -> list:
  """DDIM eta = 0 stepping to the next *listed* timestep with final alpha 1, which is what ddx
  does for every spacing (diffusers' DDIMScheduler uses t - T//S, diffusers#11347).
  Reference: DPMSolverMultistepScheduler, first order, on the same custom grid with
  final sigma 0 (DPM-Solver++-1 is algebraically the DDIM eta = 0 step)."""
  assert c["eta"] == 0 and c["set_alpha_to_one"] and not (c["clip_sample"] or c["thresholding"])
  ts = ddx.samplers.grids.make(c["spacing"], T, c["S"], c["steps_offset"])
  return dpm_reference(
    dpm_case(
      schedule=c["schedule"],
      solver_order=1,
      final_sigmas_type="zero",
      prediction=c["prediction"],
      timesteps=tuple(int(t) for t in ts),
      S=len(ts),
    )
  )


def ddim_via_ddpm_reference(c: dict, key) -> list:
  """DDIM eta = 1 with final alpha 1 and no clipping is DDPM fixed_small on the same grid
  ; diffusers' DDPMScheduler uses the next listed timestep (PR #9384), so it
  is the reference for the spacings where DDIMScheduler's t - T//S is wrong."""
  assert c["eta"] == 1 and c["set_alpha_to_one"] and not (c["clip_sample"] or c["thresholding"])
  return ddpm_reference(
    ddpm_case(
      schedule=c["schedule"],
      variance="fixed_small",
      spacing=c["spacing"],
      steps_offset=c["steps_offset"],
      S=c["S"],
      prediction=c["prediction"],
      clip_sample=False,
    ),
    key,
  )


DOC_PLMS_CASES = [
  plms_case(prediction=p, **kw)
  for p in ("v", "x0")
  for kw in (
    dict(),
    dict(S=1),
    dict(S=2),
    dict(S=3),
    dict(S=5),
    dict(schedule="linear", steps_offset=0, set_alpha_to_one=True),
  )
]
DOC_DDIM_CASES = [
  ddim_case(spacing=sp, S=S, eta=eta, prediction=p, schedule=sch)
  for sp, S in (("trailing", 13), ("trailing", 30), ("linspace", 10), ("linspace", 25))
  for eta in (0.0, 1.0)
  for p, sch in (("eps", "linear"), ("v", "scaled_linear"))
]
