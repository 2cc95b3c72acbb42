"""Latent diffusion: text embeddings -> any ddx sampler in the autoencoder's latent space -> images.

    images = ddx.latent.generate(unet, vae, context, uncond_context, sampler, x_T, key,
                                 guidance_scale=7.5)

* ``unet``: a `ddx.models.UNetCond` (or any ``model(x, t, context) -> eps/v/x0`` with
  ``in_channels``, ``cross_attention_dim`` and ``num_levels`` attributes); ``vae``: a
  `ddx.models.AutoencoderKL`.
* ``context`` / ``uncond_context``: text-encoder hidden states [B, L, D] for the prompts and for
  the empty (or negative) prompt; ``uncond_context=None`` samples without guidance.
* ``x_T``: the initial *scaled* latents [B, h, w, latent_channels] (standard normal noise
  for the samplers here; inject them to reproduce another implementation's run).
* The sampler runs through `ddx.sample` (one jitted ``lax.scan``); the final latents are
  decoded with ``vae.decode`` (which unscales them: ``z / scaling_factor + shift_factor``).
  Stable Diffusion's scheduler settings are `sd_sampler`'s defaults.

Shapes and widths are checked before anything is compiled (one-line ValueError).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ddx import guidance, samplers, schedules
from ddx.driver import sample

# Stable Diffusion 1.x / 2.x training schedule (diffusers' scheduler_config.json of those
# pipelines): scaled_linear betas 0.00085 -> 0.012 over T = 1000.
__all__ = ["generate", "decode", "sd_sampler", "check_inputs", "SD_SCHEDULE"]

SD_SCHEDULE = dict(name="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012)


def sd_sampler(name: str, num_steps: int, *, prediction: str = "eps", **kwargs):
  """A ddx sampler with Stable Diffusion's settings: scaled_linear 0.00085 / 0.012, leading
  spacing with ``steps_offset=1``, ``set_alpha_to_one=False``, no x0 clipping."""
  sched = schedules.make(**SD_SCHEDULE)
  defaults = {"ddim": dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False),
              "plms": dict(steps_offset=1, set_alpha_to_one=False),
              "ddpm": dict(steps_offset=1, clip_sample=False),
              "dpm_solver++": dict()}
  key = samplers.canonical(name)
  return samplers.make(name, sched, num_steps, prediction=prediction,
                       **{**defaults.get(key, {}), **kwargs})


def check_inputs(unet, vae, context, uncond_context, x_T) -> None:
  """Static shape checks of `generate`'s arguments; one-line ValueError naming the argument."""
  c_in = unet.in_channels
  if len(x_T.shape) != 4 or x_T.shape[-1] != c_in:
    raise ValueError(f"x_T: expected latents [B, h, w, {c_in}] (the U-Net's in_channels), "
                     f"got shape {tuple(x_T.shape)}")
  if vae is not None and vae.latent_channels != c_in:
    raise ValueError(f"vae: its latent_channels {vae.latent_channels} differ from the U-Net's "
                     f"in_channels {c_in}")
  div = 2 ** (unet.num_levels - 1)
  if x_T.shape[1] % div or x_T.shape[2] % div:
    raise ValueError(f"x_T: latent height and width must be divisible by {div}, "
                     f"got {tuple(x_T.shape[1:3])}")
  d = unet.cross_attention_dim
  for name, c in (("context", context), ("uncond_context", uncond_context)):
    if c is None:
      continue
    if len(c.shape) != 3 or c.shape[-1] != d:
      raise ValueError(f"{name}: expected text embeddings [B, L, {d}] (the U-Net's "
                       f"cross_attention_dim), got shape {tuple(c.shape)}")
    if c.shape[0] != x_T.shape[0]:
      raise ValueError(f"{name}: batch {c.shape[0]} differs from x_T's batch {x_T.shape[0]}")
  if uncond_context is not None and uncond_context.shape[1] != context.shape[1]:
    raise ValueError(f"uncond_context: length {uncond_context.shape[1]} differs from the "
                     f"context's {context.shape[1]}")


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
  return nnx.merge(graphdef, state).decode(z)


def decode(vae, latents: jax.Array) -> jax.Array:
  """Scaled latents -> images float32 [B, H, W, C] (about [-1, 1]), jitted."""
  graphdef, state = nnx.split(vae)
  return _decode(graphdef, state, latents)


def generate(unet, vae, context, uncond_context, sampler, x_T, key=None,
             guidance_scale: float = 7.5, *, return_latents: bool = False):
  """Sample latents with classifier-free guidance and decode them.

  Args:
    unet: the latent denoiser, ``unet(x, t, context)``.
    vae: the autoencoder (``decode`` takes scaled latents); None returns latents only.
    context: float [B, L, D] text embeddings of the prompts.
    uncond_context: float [B, L, D] embeddings of the unconditional (empty / negative)
      prompt, or None for no guidance (then ``guidance_scale`` is ignored).
    sampler: any ddx sampler, e.g. ``sd_sampler("plms", 50)``.
    x_T: float [B, h, w, C] initial latents (scaled latent space).
    key: PRNG key, required by stochastic samplers only.
    guidance_scale: w in ``eps_u + w (eps_c - eps_u)``; every value is applied as given
      (1 = conditional only, with the cost of the unconditional half).
    return_latents: also return the final latents.

  Returns:
    images float32 [B, h*f, w*f, C_img] (f the VAE's downscale), or ``(images, latents)``;
    just the latents when ``vae`` is None.
  """
  context = jnp.asarray(context, jnp.float32)
  uncond = None if uncond_context is None else jnp.asarray(uncond_context, jnp.float32)
  x_T = jnp.asarray(x_T, jnp.float32)
  check_inputs(unet, vae, context, uncond, x_T)
  if uncond is None:
    model_fn = guidance.text_conditional(unet, context)
  else:
    model_fn = guidance.classifier_free_context(unet, context, uncond, guidance_scale)
  latents = sample(model_fn, sampler, x_T, key)
  if vae is None:
    return latents
  images = decode(vae, latents)
  return (images, latents) if return_latents else images
