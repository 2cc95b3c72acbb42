"""A trained model back from its workdir: what ``sample``, ``eval``, the editing commands and
``train`` (for latent models, the frozen autoencoder) share.

Everything is rebuilt from the workdir alone: ``config.json`` (translated by `ddx.cli.config`)
names the architecture, the schedule and, for a latent model, the autoencoder that decodes
its samples; the checkpoint holds the weights (checked against their checksums).

    s = restore.for_sampling(workdir, "ddim", 50)        # EMA weights of the latest step
    images = s.images(jax.random.key(0), 64)          # host float32 [64, H, W, C] in [-1, 1]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx import guidance, parallel, samplers, schedules, storage
from ddx.cli import config as config_lib
from ddx.latent import generation
from ddx.models import AutoencoderConfig, AutoencoderKL, UNet, UNetConfig, abstract, param_shapes, with_params
from ddx.sampling import make_sample_fn
from ddx.training import checkpoint

PARAM_ITEMS = checkpoint.PARAM_ITEMS


def _check_which(which: str) -> None:
  if which not in PARAM_ITEMS:
    raise ValueError(f"which: must be one of {PARAM_ITEMS}, got {which!r}")


def _restore(workdir: str, config_cls, section: dict, overrides: dict, which: str, step: int | None):
  """The network of a workdir's model ``section`` (``config_cls.from_json``, with ``overrides``)
  holding the checkpoint's weights ``which`` at ``step``: ``(model, step)``."""
  try:
    config = config_cls.from_json({**section, **overrides})
  except ValueError as e:
    raise ValueError(f"{os.path.join(workdir, checkpoint.CONFIG_NAME)}: model section: {e}") from None
  module = abstract(config)
  step, items = checkpoint.restore(workdir, step, {which: param_shapes(module)})
  return with_params(module, items[which]), step


def load_model(
  workdir: str | os.PathLike, which: str = "ema_params", step: int | None = None, **model_overrides
) -> tuple[UNet, dict, int]:
  """Rebuild the workdir's model from ``config.json`` and load the weights ``which``.

  Args:
    workdir: the run directory.
    which: the checkpoint item holding the weights: "ema_params" (default) or "params".
    step: the checkpoint step (default: the latest).
    **model_overrides: `UNetConfig` fields that do not change the parameters, e.g.
      ``dtype="bfloat16"`` or ``remat=True``.

  Returns:
    ``(model, config, step)``: the model, the parsed config.json and the step restored.
  """
  _check_which(which)
  workdir = storage.normalize(workdir, "workdir")
  config = checkpoint.read_config(workdir)
  if config.get("kind", "diffusion") != "diffusion":
    raise ValueError(f"{workdir}: holds an {config['kind']} (config.json kind), not a diffusion model")
  model, step = _restore(workdir, UNetConfig, config["model"], model_overrides, which, step)
  return model, config, step


def load_autoencoder(
  workdir: str | os.PathLike, which: str = "ema_params", step: int | None = None, **overrides
) -> tuple[AutoencoderKL, dict, int]:
  """An autoencoder workdir's `AutoencoderKL` with the weights ``which``: ``(vae, config, step)``.

  ``overrides`` are `AutoencoderConfig` fields that leave the parameters alone, e.g. the
  ``scaling_factor`` a latent model estimated for these latents.
  """
  _check_which(which)
  workdir = storage.normalize(workdir, "workdir")
  config = checkpoint.read_trained_config(workdir, "autoencoder")
  vae, step = _restore(workdir, AutoencoderConfig, config["model"], overrides, which, step)
  return vae, config, step


def load_latent_decoder(config: dict) -> AutoencoderKL | None:
  """The autoencoder that decodes a latent diffusion model's samples (its config's ``latent``
  section: workdir, step and scaling factor; EMA weights), or None for a pixel-space model."""
  latent = config.get("latent") or {}
  if not latent.get("autoencoder_workdir"):
    return None
  vae, _, _ = load_autoencoder(
    latent["autoencoder_workdir"], step=latent.get("autoencoder_step"), scaling_factor=latent["scaling_factor"]
  )
  return vae


def decode_latents(vae: AutoencoderKL, latents) -> np.ndarray:
  """Scaled latents [N, h, w, c] -> images float32 [N, H, W, C] on the host, clipped to [-1, 1]
  (the range every image writer of ddx takes)."""
  return np.clip(np.asarray(jax.device_get(generation.decode(vae, jnp.asarray(latents)))), -1.0, 1.0)


def make_sampler(
  config: dict, name: str, steps: int, *, eta: float = 0.0, clip_sample: bool = True, sigmas: str | None = None
):
  """The schedule and a sampler for a trained model's ``config`` (its diffusion section)."""
  diffusion = config["diffusion"]
  sched = schedules.make(**config_lib.schedule_kwargs(diffusion))
  kwargs = config_lib.sampler_kwargs(diffusion, sampler=name, eta=eta, clip_sample=clip_sample, sigmas=sigmas)
  return sched, samplers.make(name, sched, steps, **kwargs)


@dataclasses.dataclass
class Sampling:
  """A workdir's model ready to sample, its batch sharded over every device.

  ``fn(params, key, shape, labels)`` samples the model's own space (latents for a latent
  model; `ddx.sampling.make_sample_fn`); `images` also decodes them. ``sample_shape`` is one
  sample of ``fn``, ``image_shape`` one decoded image.
  """

  fn: Callable
  params: Any
  config: dict
  step: int
  which: str
  num_classes: int | None
  sample_shape: tuple
  image_shape: tuple
  decoder: AutoencoderKL | None = None

  def images(self, key: jax.Array, num: int, labels=None) -> np.ndarray:
    """``num`` samples as host float32 images [num, H, W, C] (decoded for a latent model)."""
    x = parallel.to_host(self.fn(self.params, key, (num,) + self.sample_shape, labels))
    if self.decoder is None or not np.all(np.isfinite(x)):
      return x  # the caller refuses non-finite samples
    return decode_latents(self.decoder, x)

  def image_fn(self) -> Callable:
    """``fn(params, key, shape, labels) -> images`` for `ddx.eval.quality.measure` (``shape``
    is the batch of images)."""
    return lambda params, key, shape, labels=None: Sampling.images(
      dataclasses.replace(self, params=params), key, shape[0], labels
    )


def for_sampling(
  workdir: str,
  sampler_name: str,
  steps: int,
  *,
  eta: float = 0.0,
  which: str = "ema_params",
  step: int | None = None,
  guidance_scale: float = 1.0,
  config: dict | None = None,
  mesh: jax.sharding.Mesh | None = None,
  sigmas: str | None = None,
  guidance_rescale: float = 0.0,
  guidance_interval: tuple[float, float] | None = None,
) -> Sampling:
  """Restore the workdir's weights ``which`` at ``step`` (default: the latest), build its
  sampler (x0 clipping from the config's ``sample.clip_sample``) and a sharded sample function
  over ``mesh`` (default: every device); decode with the autoencoder the config names."""
  config = checkpoint.read_config(workdir) if config is None else config
  clip = (config.get("sample") or {}).get("clip_sample", True)
  sched, sampler = make_sampler(config, sampler_name, steps, eta=eta, clip_sample=clip, sigmas=sigmas)
  model, _, step = load_model(workdir, which=which, step=step)
  graphdef, params = nnx.split(model, nnx.Param)
  mesh = parallel.data_mesh() if mesh is None else mesh
  params = parallel.replicate(params, mesh)  # restored onto one device; the batch spans them all
  num_classes = config["model"].get("num_classes")
  fn = make_sample_fn(
    graphdef,
    sampler,
    num_classes,
    mesh,
    guidance_scale,
    guidance_rescale=guidance_rescale,
    guidance_interval=guidance_interval,
    sched=sched,
    edm_sigma_data=config_lib.edm_sigma_data(config["diffusion"]),
  )
  size, ch = config["model"]["image_size"], config["model"]["in_channels"]
  decoder = load_latent_decoder(config)
  image_shape = (size, size, ch)
  if decoder is not None:
    f = decoder.downscale
    image_shape = (size * f, size * f, decoder.config.out_channels)
  return Sampling(
    fn=fn,
    params=params,
    config=config,
    step=step,
    which=which,
    num_classes=num_classes,
    sample_shape=(size, size, ch),
    image_shape=image_shape,
    decoder=decoder,
  )


def labels_for(config: dict, num: int, label: int | None = None) -> np.ndarray | None:
  """`ddx.guidance.default_labels` for a workdir config's model."""
  return guidance.default_labels(num, config["model"].get("num_classes"), label)
