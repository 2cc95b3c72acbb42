"""Denoiser networks (flax.nnx, NHWC).

``UNet`` is the DDPM-family U-Net; ``from_diffusers`` imports a diffusers ``UNet2DModel``
folder into it; ``unet_param_count`` counts parameters without allocating them.
"""

from ddx.models.convert import (diffusers_scheduler_to_diffusion, diffusers_to_unet_kwargs,
                                 from_diffusers, unet_from_params)
from ddx.models.unet import (UNET_KWARGS, UNet, abstract_unet, unet_kwargs, unet_param_count,
                             validate_kwargs)

__all__ = [
    "UNet", "UNET_KWARGS", "abstract_unet", "unet_param_count", "unet_kwargs", "validate_kwargs",
    "from_diffusers", "diffusers_to_unet_kwargs", "diffusers_scheduler_to_diffusion",
    "unet_from_params",
]

# The latent-diffusion stack (imported after the DDPM U-Net; see ddx/models/convert_latent.py).
from ddx.models.autoencoder import AutoencoderKL, DiagonalGaussian  # noqa: E402
from ddx.models.clip_text import CLIPTextEncoder  # noqa: E402
from ddx.models.convert_latent import (autoencoder_from_diffusers,  # noqa: E402
                                        clip_text_from_transformers, unet_cond_from_diffusers)
from ddx.models.unet_cond import UNetCond, abstract_unet_cond, unet_cond_param_count  # noqa: E402

__all__ += ["AutoencoderKL", "DiagonalGaussian", "autoencoder_from_diffusers", "UNetCond",
            "abstract_unet_cond", "unet_cond_param_count", "unet_cond_from_diffusers",
            "CLIPTextEncoder", "clip_text_from_transformers"]
