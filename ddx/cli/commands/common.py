"""Flag definitions and checks shared by several commands.

"Not given" is always ``None``; a given value is checked for its own range (0 included), and a
bad one is a one-line ``ValueError`` naming the flag.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
from absl import flags

from ddx import guidance, images, parallel, samplers, storage
from ddx.cli import config as config_lib
from ddx.cli import limits, restore
from ddx.training import checkpoint


def define_workdir(fv: flags.FlagValues, help_text: str = "Run directory (config.json + checkpoints/).") -> None:
  flags.DEFINE_string("workdir", None, help_text, flag_values=fv)


def define_distributed(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("coordinator", None, "Multi-process coordinator address host:port.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).", flag_values=fv)


def check_distributed(fv: flags.FlagValues) -> None:
  """Range checks of --num_processes / --process_id (before anything is started)."""
  n = check_int(fv, "num_processes", lo=1, hi=limits.MAX_PROCESSES)
  check_int(fv, "process_id", lo=0, hi=(n - 1) if n is not None else limits.MAX_PROCESSES - 1)


def init_distributed(fv: flags.FlagValues) -> None:
  """Start multi-controller JAX when asked to (flags, DDX_* variables, TPU pods, SLURM)."""
  check_distributed(fv)
  parallel.initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)


def require(fv: flags.FlagValues, *names: str) -> None:
  for n in names:
    if fv[n].value in (None, ""):
      raise ValueError(f"--{n}: required")


def workdir(fv: flags.FlagValues) -> str:
  require(fv, "workdir")
  wd = storage.normalize(fv.workdir, "--workdir")
  try:
    checkpoint.checkpoint_dir(wd)  # refuses a store that checkpoints cannot be written to
  except ValueError as e:
    raise ValueError(f"--{e}") from None
  storage.check_reachable(wd, "--workdir")
  return wd


def check_int(fv: flags.FlagValues, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
  """The flag's value if given (``lo <= v <= hi``), else None."""
  v = fv[name].value
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, int):
    raise ValueError(f"--{name}: must be an integer, got {v!r}")
  if lo is not None and v < lo:
    raise ValueError(f"--{name}: must be >= {lo}, got {v}")
  if hi is not None and v > hi:
    raise ValueError(f"--{name}: must be <= {hi}, got {v}")
  return v


def check_float(fv: flags.FlagValues, name: str, lo: float | None = None, hi: float | None = None) -> float | None:
  """The flag's value if given (finite, ``lo <= v <= hi``), else None."""
  v = fv[name].value
  if v is None:
    return None
  if not math.isfinite(v):
    raise ValueError(f"--{name}: must be a finite number, got {v}")
  if lo is not None and v < lo:
    raise ValueError(f"--{name}: must be >= {lo}, got {v}")
  if hi is not None and v > hi:
    raise ValueError(f"--{name}: must be <= {hi}, got {v}")
  return v


def check_out(fv: flags.FlagValues, name: str = "out") -> str | None:
  """An output prefix if given (not given is None; an empty one is an error, never the default)."""
  v = fv[name].value
  if v is not None and not v.strip():
    raise ValueError(f"--{name}: must be a non-empty path prefix")
  if v is not None:
    storage.normalize(v, f"--{name}")  # a scheme ddx cannot write, or its client missing: one line now
  return v


def check_steps(
  fv: flags.FlagValues, num_timesteps: int, source: str = "the model's diffusion.num_timesteps", name: str = "steps"
) -> int | None:
  """--steps if given: 1 <= S <= the model's T (named by ``source``)."""
  v = check_int(fv, name, lo=1, hi=limits.MAX_TIMESTEPS)
  if v is not None and v > num_timesteps:
    raise ValueError(f"--{name}: must be <= {num_timesteps} ({source}), got {v}")
  return v


def define_sigmas(fv) -> None:
  flags.DEFINE_string(
    "sigmas",
    None,
    "Noise-level grid (the euler family and dpm_solver++): karras | exponential | beta "
    "(default: the timestep spacing's own).",
    flag_values=fv,
  )


def define_guidance_options(fv) -> None:
  flags.DEFINE_float(
    "guidance_rescale", None, "CFG rescale phi in [0, 1] (0 = off; needs --guidance != 1).", flag_values=fv
  )
  flags.DEFINE_string(
    "guidance_interval",
    None,
    "LO,HI: apply guidance only at noise levels σ in [LO, HI] (conditional elsewhere; needs --guidance != 1).",
    flag_values=fv,
  )


def check_guidance_options(fv, guided: bool) -> tuple[float, tuple[float, float] | None]:
  """(--guidance_rescale or 0, --guidance_interval as (lo, hi) or None): one line for a bad value,
  or for either without guidance."""
  rescale = check_float(fv, "guidance_rescale", lo=0.0, hi=1.0)
  interval = None
  if fv.guidance_interval is not None:
    try:
      lo, hi = (float(v) for v in fv.guidance_interval.split(","))
    except ValueError:
      raise ValueError(f"--guidance_interval: expected LO,HI (two numbers), got {fv.guidance_interval!r}") from None
    if not (math.isfinite(lo) and lo >= 0 and hi > lo):
      raise ValueError(f"--guidance_interval: needs 0 <= LO < HI (HI may be inf), got {fv.guidance_interval!r}")
    interval = (lo, hi)
  for name, value in (("guidance_rescale", rescale), ("guidance_interval", interval)):
    if value and not guided:  # a rescale of 0 is off, whatever the guidance
      raise ValueError(f"--{name}: only applies with classifier-free guidance (--guidance != 1)")
  return rescale or 0.0, interval


def check_sigmas(fv, sampler: str) -> str | None:
  """--sigmas: a known grid, and a σ-space sampler to take it (one line, before anything is read)."""
  value = fv.sigmas
  if value is None:
    return None
  if value not in samplers.sigmas.GRIDS:
    raise ValueError(f"--sigmas: must be one of {samplers.sigmas.GRIDS}, got {value!r}")
  if sampler not in config_lib.SIGMA_SAMPLERS:
    raise ValueError(f"--sigmas: only the samplers {config_lib.SIGMA_SAMPLERS} take it, got {sampler}")
  return value


def check_eta_sampler(eta: float | None, sampler: str) -> None:
  """A non-zero --eta is DDIM's alone: the other samplers would ignore or reject it later."""
  if eta is not None and eta != 0 and sampler != "ddim":
    raise ValueError(f"--eta: only the ddim sampler takes eta > 0, got {eta} with sampler {sampler}")


# --- what the editing commands (invert, interpolate, edit, inpaint) share -------------------


def define_model_flags(fv: flags.FlagValues) -> None:
  """--workdir, --checkpoint_step, --use_ema, --label, --seed, --out."""
  define_workdir(fv)
  flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_bool("use_ema", True, "Use the EMA weights (else the raw params).", flag_values=fv)
  flags.DEFINE_integer(
    "label", None, "Class label (class-conditional models; default: the null label).", flag_values=fv
  )
  flags.DEFINE_integer("seed", 0, "PRNG seed.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output prefix: writes <out>.png and <out>.npz.", flag_values=fv)


def check_paths(fv: flags.FlagValues, name: str, count: int | None = None) -> list[str]:
  """A comma-separated list of existing files (``count`` of them if given)."""
  require(fv, name)
  paths = [p for p in fv[name].value.split(",") if p]
  if not paths:
    raise ValueError(f"--{name}: no file given, got {fv[name].value!r}")
  if count is not None and len(paths) != count:
    raise ValueError(f"--{name}: expected {count} comma-separated files, got {len(paths)}")
  for p in paths:
    if not storage.isfile(storage.normalize(p, f"--{name}")):
      raise ValueError(f"--{name}: no such file {p!r}")
  return paths


class EditModel:
  """A workdir's model, read for editing: its config, image geometry, sampler factory and
  ``model_fn(num)``. Flags are checked before anything is restored."""

  def __init__(self, fv: flags.FlagValues):
    self.workdir = workdir(fv)
    check_out(fv)
    # each flag's own range first, then the ranges that depend on the model
    self.label = check_int(fv, "label", lo=0)
    check_int(fv, "seed", lo=0, hi=limits.MAX_SEED)
    step = check_int(fv, "checkpoint_step", lo=0, hi=limits.MAX_STEP)
    self.cfg = checkpoint.read_config(self.workdir)  # clear error for a missing / empty workdir
    self.size = int(self.cfg["model"]["image_size"])
    self.channels = int(self.cfg["model"]["in_channels"])
    self.num_classes = self.cfg["model"].get("num_classes")
    self.T = int(self.cfg["diffusion"].get("num_timesteps", 1000))
    if self.label is not None and not self.num_classes:
      raise ValueError("--label: this model is unconditional")
    if self.label is not None and self.label > self.num_classes:
      raise ValueError(
        f"--label: must be in [0, {self.num_classes}] ({self.num_classes} = unconditional), got {self.label}"
      )
    self.step = checkpoint.resolve_step(self.workdir, step)
    self.which = "ema_params" if fv.use_ema else "params"
    self.fv = fv
    self._model = None

  def load_images(self, paths: list[str], what: str):
    return np.stack([images.load_png(p, self.size, self.channels, what) for p in paths])

  def sampler(self, name: str, steps: int, *, eta: float = 0.0, clip_sample: bool | None = None):
    clip = self.cfg.get("sample", {}).get("clip_sample", True) if clip_sample is None else clip_sample
    return restore.make_sampler(self.cfg, name, steps, eta=eta, clip_sample=clip)[1]

  def model_fn(self, num: int):
    if self._model is None:
      self._model, _, self.step = restore.load_model(self.workdir, which=self.which, step=self.step)
    labels = None if self.label is None else np.full((num,), self.label, np.int32)
    return guidance.for_labels(self._model, self.num_classes, num, labels)

  def prefix(self, default_name: str) -> str:
    if self.fv.out is not None:
      return self.fv.out
    return os.path.join(self.workdir, "edits", f"{default_name}_{self.step:08d}")


def progress_printer(what: str):
  """``progress(done, total)`` for `ddx.sample`: a line on stderr about every 10% of a run."""
  t0 = [None]

  def progress(done: int, total: int) -> None:
    if t0[0] is None or done == 1:
      t0[0] = time.time()
    if done == total or done % max(1, total // 10) == 0:
      sys.stderr.write(f"{what}: {done}/{total} ({time.time() - t0[0]:.1f}s)\n")
      sys.stderr.flush()

  return progress


def refuse_nonfinite(context: str = "", /, **arrays) -> None:
  """ValueError (nothing written) if any output holds NaN or inf; ``context`` (e.g. which
  weights made them) goes into the message in parentheses."""
  for name, a in arrays.items():
    bad = int(np.size(a) - np.isfinite(a).sum())
    if bad:
      where = f" ({context})" if context else ""
      raise ValueError(f"{name}: {bad} of {np.size(a)} values are not finite{where}; nothing written")


def write_outputs(prefix: str, rows, ncols: int, scale: int, **arrays) -> tuple[str, str]:
  """A PNG grid of ``rows`` ([N, H, W, C] in [-1, 1], row-major with ``ncols``) and an .npz."""
  refuse_nonfinite(**arrays)
  png = images.save_png(prefix + ".png", images.make_grid(images.to_uint8(rows), ncols), scale=scale)
  return png, storage.save_npz(prefix + ".npz", **{k: np.asarray(v) for k, v in arrays.items()})
