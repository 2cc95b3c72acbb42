"""Denoiser networks (flax.nnx, NHWC).

* Each network is built from a frozen config (`ddx.models.configs`): ``UNet(UNetConfig(...),
  rngs=...)``, or with the config's fields as keyword arguments, ``UNet(image_size=32, ...,
  rngs=...)``. ``model.config`` is the normalised config; ``config.to_json()`` /
  ``UNetConfig.from_json(d)`` are its JSON form (a checkpoint's ``model`` section).
* ``UNet`` (``UNetConfig``): the DDPM-family U-Net.
* ``from_diffusers(path)``: a diffusers ``UNet2DModel`` folder as a ``UNet`` computing the
  same function.
* The latent-diffusion stack: ``AutoencoderKL`` (``AutoencoderConfig``,
  ``autoencoder_from_diffusers``), the text-conditional ``UNetCond`` (``UNetCondConfig``;
  ``from_diffusers`` dispatches a UNet2DConditionModel folder to ``unet_cond_from_diffusers``)
  and ``CLIPTextEncoder`` (``CLIPTextConfig``, ``clip_text_from_transformers``).
* ``abstract(config)`` builds a network without allocating its parameters, ``param_count``
  counts them and ``with_params(module, params)`` fills them from a pure dict (e.g. restored
  from a checkpoint).
"""

from ddx.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ddx.models.build import abstract, param_count, param_shapes, with_params
from ddx.models.clip_text import CLIPTextEncoder
from ddx.models.configs import AutoencoderConfig, CLIPTextConfig, UNetCondConfig, UNetConfig
from ddx.models.io.diffusers import from_diffusers
from ddx.models.io.latent import autoencoder_from_diffusers, clip_text_from_transformers, unet_cond_from_diffusers
from ddx.models.unet import UNet
from ddx.models.unet_cond import UNetCond

__all__ = [
  "UNet",
  "UNetConfig",
  "from_diffusers",
  "abstract",
  "param_shapes",
  "param_count",
  "with_params",
  "AutoencoderKL",
  "AutoencoderConfig",
  "DiagonalGaussian",
  "autoencoder_from_diffusers",
  "UNetCond",
  "UNetCondConfig",
  "unet_cond_from_diffusers",
  "CLIPTextEncoder",
  "CLIPTextConfig",
  "clip_text_from_transformers",
]
