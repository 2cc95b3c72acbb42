"""Denoiser networks (flax.nnx, NHWC).

* ``UNet``: the DDPM-family U-Net; ``unet_kwargs`` normalises and validates its constructor
  arguments, ``unet_param_count`` counts parameters without allocating them.
* ``from_diffusers(path)``: a diffusers ``UNet2DModel`` folder as a ``UNet`` computing the
  same function; ``unet_from_params(kwargs, params)`` rebuilds one from a pure param dict
  (e.g. restored from a checkpoint).
"""

from ddx.models.convert import from_diffusers, unet_from_params
from ddx.models.unet import UNet, unet_kwargs, unet_param_count

__all__ = ["UNet", "from_diffusers", "unet_from_params", "unet_kwargs", "unet_param_count"]
