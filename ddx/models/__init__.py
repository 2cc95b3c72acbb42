"""Denoiser networks (flax.nnx, NHWC).

* ``UNet``: the DDPM-family U-Net; ``unet_kwargs`` normalises and validates its constructor
  arguments, ``unet_param_count`` counts parameters without allocating them.
* ``from_diffusers(path)``: a diffusers ``UNet2DModel`` folder as a ``UNet`` computing the
  same function; ``unet_from_params(kwargs, params)`` rebuilds one from a pure param dict
  (e.g. restored from a checkpoint).
* The latent-diffusion stack: ``AutoencoderKL`` (``autoencoder_from_diffusers``), the
  text-conditional ``UNetCond`` (``from_diffusers`` dispatches a UNet2DConditionModel folder
  to ``unet_cond_from_diffusers``) and ``CLIPTextEncoder`` (``clip_text_from_transformers``).
"""

# The latent-diffusion stack (see ddx/models/io/latent.py for the importers).
from ddx.models.autoencoder import AutoencoderKL, DiagonalGaussian  # noqa: E402
from ddx.models.clip_text import CLIPTextEncoder  # noqa: E402
from ddx.models.io.diffusers import from_diffusers, unet_from_params
from ddx.models.io.latent import autoencoder_from_diffusers, clip_text_from_transformers, unet_cond_from_diffusers  # noqa: E402
from ddx.models.unet import UNet, unet_kwargs, unet_param_count
from ddx.models.unet_cond import UNetCond, unet_cond_param_count  # noqa: E402

__all__ = [
  "UNet",
  "from_diffusers",
  "unet_from_params",
  "unet_kwargs",
  "unet_param_count",
  "AutoencoderKL",
  "DiagonalGaussian",
  "autoencoder_from_diffusers",
  "UNetCond",
  "unet_cond_param_count",
  "unet_cond_from_diffusers",
  "CLIPTextEncoder",
  "clip_text_from_transformers",
]
