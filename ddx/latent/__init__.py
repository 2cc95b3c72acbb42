"""Latent diffusion (the Stable Diffusion family).

* `ddx.latent.generation`: text embeddings -> any ddx sampler in an autoencoder's latent space
  -> images; latent img2img and inpainting. Its functions are re-exported here:
  ``ddx.latent.generate(...)``, ``ddx.latent.img2img(...)``, ``ddx.latent.inpaint(...)``.
* `ddx.latent.pipeline`: a local diffusers-format pipeline folder (load, tokenize, txt2img,
  img2img, inpaint).
* `ddx.latent.data`: a data set's latents under a frozen autoencoder (what a latent diffusion
  model trains on).
"""

from ddx.latent.generation import (
  ENCODE_KEY,
  POSTERIORS,
  SD_SCHEDULE,
  check_image,
  check_inputs,
  decode,
  encode,
  generate,
  img2img,
  inpaint,
  latent_mask,
  sd_sampler,
)

__all__ = [
  "ENCODE_KEY",
  "POSTERIORS",
  "SD_SCHEDULE",
  "check_image",
  "check_inputs",
  "decode",
  "encode",
  "generate",
  "img2img",
  "inpaint",
  "latent_mask",
  "sd_sampler",
]
