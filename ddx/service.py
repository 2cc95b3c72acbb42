"""What the sampling-based commands share: a model restored from a workdir, its schedule and
sampler, and a sharded sampling function.

The commands (``sample`` and the training loop's sample grids today; evaluation and editing
build on the same pieces) call these with explicit arguments; the workdir's ``config.json`` is
translated by `ddx.config` only.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ddx
from ddx import checkpoint, guidance, parallel
from ddx import config as config_lib
from ddx.models import unet as unet_lib
from ddx.models.autoencoder import AutoencoderKL, validate_autoencoder_kwargs
from ddx.models.convert import unet_from_params

PARAM_ITEMS = checkpoint.PARAM_ITEMS


def load_model(workdir: str | os.PathLike, which: str = "ema_params", step: int | None = None,
               **model_overrides) -> tuple[nnx.Module, dict, int]:
  """Rebuild the workdir's model from ``config.json`` and load the weights ``which``.

  Args:
    workdir: the run directory.
    which: the checkpoint item holding the weights: "ema_params" (default) or "params".
    step: the checkpoint step (default: the latest).
    **model_overrides: constructor arguments that do not change the parameters, e.g.
      ``dtype="bfloat16"`` or ``remat=True``.

  Returns:
    ``(model, config, step)``: the model, the parsed config.json and the step restored.
  """
  if which not in PARAM_ITEMS:
    raise ValueError(f"which: must be one of {PARAM_ITEMS}, got {which!r}")
  workdir = os.path.abspath(os.fspath(workdir))
  config = checkpoint.read_config(workdir)
  if config.get("kind", "diffusion") != "diffusion":
    raise ValueError(f"{workdir}: holds an {config['kind']} (config.json kind), not a diffusion model")
  try:
    kwargs = unet_lib.unet_kwargs(**{**config["model"], **model_overrides})
  except (TypeError, ValueError) as e:
    raise ValueError(f"{os.path.join(workdir, checkpoint.CONFIG_NAME)}: model section: {e}") from None
  abstract = nnx.to_pure_dict(nnx.state(unet_lib.abstract_unet(**kwargs), nnx.Param))
  step, items = checkpoint.restore(workdir, step, {which: abstract})
  return unet_from_params(kwargs, items[which]), config, step


def read_autoencoder_config(workdir: str, name: str = "workdir") -> dict:
  """``config.json`` of a workdir that holds a trained autoencoder (kind "autoencoder", at least
  one checkpoint); otherwise a one-line ValueError starting with ``name``."""
  if not isinstance(workdir, str) or not workdir.strip():
    raise ValueError(f"{name}: must be the path of an autoencoder workdir, got {workdir!r}")
  try:
    config = checkpoint.read_config(workdir)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"{name}: {e}") from None
  kind = config.get("kind", "diffusion")
  if kind != "autoencoder":
    raise ValueError(f"{name}: {workdir} holds a {kind} model, not an autoencoder (its config.json kind)")
  if checkpoint.latest_step(workdir) is None:
    raise ValueError(f"{name}: no checkpoint in {checkpoint.checkpoint_dir(workdir)}")
  return config


def load_autoencoder(workdir: str | os.PathLike, which: str = "ema_params", step: int | None = None,
                     **overrides) -> tuple[AutoencoderKL, dict, int]:
  """An autoencoder workdir's `AutoencoderKL` with the weights ``which``: ``(vae, config, step)``.

  ``overrides`` are constructor arguments that leave the parameters alone, e.g. the
  ``scaling_factor`` a latent model estimated for these latents.
  """
  if which not in PARAM_ITEMS:
    raise ValueError(f"which: must be one of {PARAM_ITEMS}, got {which!r}")
  workdir = os.path.abspath(os.fspath(workdir))
  config = read_autoencoder_config(workdir)
  try:
    kwargs = validate_autoencoder_kwargs(**{**config["model"], **overrides})
  except (TypeError, KeyError, ValueError) as e:
    raise ValueError(f"{os.path.join(workdir, checkpoint.CONFIG_NAME)}: model section: {e}") from None
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(**kwargs, rngs=nnx.Rngs(0))),
                                     nnx.Param, ...)
  step, items = checkpoint.restore(workdir, step, {which: nnx.to_pure_dict(params)})
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, items[which]))
  return nnx.merge(graphdef, params, rest), config, step


def load_latent_decoder(config: dict) -> AutoencoderKL | None:
  """The autoencoder that decodes a latent diffusion model's samples (its config's ``latent``
  section: workdir, step and scaling factor; EMA weights), or None for a pixel-space model."""
  latent = config.get("latent") or {}
  if not latent.get("autoencoder_workdir"):
    return None
  vae, _, _ = load_autoencoder(latent["autoencoder_workdir"], step=latent.get("autoencoder_step"),
                               scaling_factor=latent["scaling_factor"])
  return vae


def decode_latents(vae: AutoencoderKL, latents) -> np.ndarray:
  """Scaled latents [N, h, w, c] -> images float32 [N, H, W, C] on the host, clipped to [-1, 1]
  (the range every image writer of ddx takes)."""
  from ddx import latent as latent_lib  # pylint: disable=import-outside-toplevel
  return np.clip(np.asarray(jax.device_get(latent_lib.decode(vae, jnp.asarray(latents)))), -1.0, 1.0)


def make_sampler(config: dict, name: str, steps: int, *, eta: float = 0.0, clip_sample: bool = True):
  """The schedule and a sampler for a trained model's ``config`` (its diffusion section)."""
  diffusion = config["diffusion"]
  sched = ddx.schedules.make(**config_lib.schedule_kwargs(diffusion))
  kwargs = config_lib.sampler_kwargs(diffusion, sampler=name, eta=eta, clip_sample=clip_sample)
  return sched, ddx.samplers.make(name, sched, steps, **kwargs)


@functools.partial(jax.jit, static_argnames=("shape", "sharding"))
def initial_noise(key, *, shape, sharding):
  """Standard normal x_T drawn inside jit straight into ``sharding`` (every process makes its
  own shards; with partitionable threefry the values do not depend on the sharding)."""
  return jax.lax.with_sharding_constraint(jax.random.normal(key, shape, jnp.float32), sharding)


def guided_model_fn(model, num_classes: int | None, num: int, labels=None, guidance_scale: float = 1.0):
  """``model_fn(x, t)`` for a batch of ``num``: unconditional, class-conditional (``labels``
  int [num]; None = the null label), or classifier-free guided when ``guidance_scale != 1``."""
  if not num_classes:
    return guidance.conditional(model, None)
  y = jnp.full((num,), num_classes, jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
  if guidance_scale != 1.0:
    return guidance.classifier_free(model, y, num_classes, guidance_scale)
  return guidance.conditional(model, y)


def make_sample_fn(graphdef, sampler, num_classes: int | None, mesh, guidance_scale: float = 1.0):
  """``fn(params, key, shape, labels=None) -> samples [shape]``, batch sharded over ``mesh``.

  ``labels`` int [N] (class-conditional models; None = the null label) select the classes;
  ``guidance_scale != 1`` applies classifier-free guidance. x_T comes from ``fold_in(key, 0)``
  and the sampler's noise from ``fold_in(key, 1)``.
  """

  def fn(params, key, shape, labels=None):
    model_fn = guided_model_fn(nnx.merge(graphdef, params), num_classes, shape[0], labels, guidance_scale)
    sharding = parallel.batch_sharding(mesh) if shape[0] % mesh.devices.size == 0 else parallel.replicated(mesh)
    x_T = initial_noise(jax.random.fold_in(key, 0), shape=tuple(shape), sharding=sharding)
    return ddx.sample(model_fn, sampler, x_T, jax.random.fold_in(key, 1))

  return fn


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process sharded) global array as one numpy array on every process."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def default_labels(num: int, num_classes: int | None, label: int | None) -> Any:
  """int32 [num] labels for a class-conditional model: ``label`` everywhere, else cycling
  0..num_classes-1; None for an unconditional model."""
  if not num_classes:
    return None
  if label is not None:
    return np.full((num,), label, np.int32)
  return (np.arange(num) % num_classes).astype(np.int32)
