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

Editing in latent space (`img2img`, `inpaint`) encodes the image with ``vae.encode_latents``
(a posterior sample from ``fold_in(key, ENCODE_KEY)`` by default, as diffusers'
StableDiffusionImg2ImgPipeline samples its ``latent_dist``; ``posterior="mean"`` takes the
mean), runs ddx.edit's SDEdit / replacement inpainting on the scaled latents with the
guided U-Net, and decodes. They need a DDPM or DDIM sampler (a run that starts mid-grid or
pastes after every call needs a single-step sampler; ddx/sampling.py).

Shapes and widths are checked before anything is compiled (one-line ValueError).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx import edit, guidance, samplers, schedules
from ddx.sampling import sample

# Stable Diffusion 1.x / 2.x training schedule (diffusers' scheduler_config.json of those
# pipelines): scaled_linear betas 0.00085 -> 0.012 over T = 1000.
__all__ = [
  "generate",
  "decode",
  "encode",
  "img2img",
  "inpaint",
  "latent_mask",
  "check_image",
  "sd_sampler",
  "check_inputs",
  "SD_SCHEDULE",
  "POSTERIORS",
  "ENCODE_KEY",
]

SD_SCHEDULE = dict(name="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012)


def sd_sampler(name: str, num_steps: int, *, prediction: str = "eps", **kwargs):
  """A ddx sampler with Stable Diffusion's settings: scaled_linear 0.00085 / 0.012, leading
  spacing with ``steps_offset=1`` (also for the σ-space samplers), ``set_alpha_to_one=False``,
  no x0 clipping."""
  sched = schedules.make(**SD_SCHEDULE)
  defaults = {
    "ddim": dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False),
    "plms": dict(steps_offset=1, set_alpha_to_one=False),
    "ddpm": dict(steps_offset=1, clip_sample=False),
    "dpm_solver++": dict(),
    **{n: dict(steps_offset=1, spacing="leading") for n in samplers.SIGMA_NAMES},
  }
  key = samplers.canonical(name)
  return samplers.make(name, sched, num_steps, prediction=prediction, **{**defaults.get(key, {}), **kwargs})


def check_inputs(unet, vae, context, uncond_context, x_T) -> None:
  """Static shape checks of `generate`'s arguments; one-line ValueError naming the argument."""
  c_in = unet.in_channels
  if len(x_T.shape) != 4 or x_T.shape[-1] != c_in:
    raise ValueError(f"x_T: expected latents [B, h, w, {c_in}] (the U-Net's in_channels), got shape {tuple(x_T.shape)}")
  if vae is not None and vae.latent_channels != c_in:
    raise ValueError(f"vae: its latent_channels {vae.latent_channels} differ from the U-Net's in_channels {c_in}")
  div = 2 ** (unet.num_levels - 1)
  if x_T.shape[1] % div or x_T.shape[2] % div:
    raise ValueError(f"x_T: latent height and width must be divisible by {div}, got {tuple(x_T.shape[1:3])}")
  d = unet.cross_attention_dim
  for name, c in (("context", context), ("uncond_context", uncond_context)):
    if c is None:
      continue
    if len(c.shape) != 3 or c.shape[-1] != d:
      raise ValueError(
        f"{name}: expected text embeddings [B, L, {d}] (the U-Net's cross_attention_dim), got shape {tuple(c.shape)}"
      )
    if c.shape[0] != x_T.shape[0]:
      raise ValueError(f"{name}: batch {c.shape[0]} differs from x_T's batch {x_T.shape[0]}")
  if uncond_context is not None and uncond_context.shape[1] != context.shape[1]:
    raise ValueError(f"uncond_context: length {uncond_context.shape[1]} differs from the context's {context.shape[1]}")


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
  return nnx.merge(graphdef, state).decode(z)


def decode(vae, latents: jax.Array) -> jax.Array:
  """Scaled latents -> images float32 [B, H, W, C] (about [-1, 1]), jitted."""
  graphdef, state = nnx.split(vae)
  return _decode(graphdef, state, latents)


def generate(
  unet,
  vae,
  context,
  uncond_context,
  sampler,
  x_T,
  key=None,
  guidance_scale: float = 7.5,
  *,
  return_latents: bool = False,
  guidance_rescale: float = 0.0,
  guidance_interval: tuple[float, float] | None = None,
  sched=None,
):
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
    guidance_rescale: CFG rescale phi in [0, 1] (`ddx.guidance.rescaled`; 0 = off).
    guidance_interval: ``(σ_lo, σ_hi)``: guide only the calls whose noise level lies in it
      (`ddx.guidance.interval`; needs ``sched``, the U-Net's `ddx.Schedule`).

  Returns:
    images float32 [B, h*f, w*f, C_img] (f the VAE's downscale), or ``(images, latents)``;
    just the latents when ``vae`` is None.
  """
  context = jnp.asarray(context, jnp.float32)
  uncond = None if uncond_context is None else jnp.asarray(uncond_context, jnp.float32)
  x_T = jnp.asarray(x_T, jnp.float32)
  check_inputs(unet, vae, context, uncond, x_T)
  model_fn = _guided(unet, context, uncond, guidance_scale, guidance_rescale)
  if guidance_interval is not None and uncond is not None:
    if sched is None:
      raise ValueError("sched: required with guidance_interval (the σ of each timestep)")
    model_fn = guidance.interval(model_fn, guidance.text_conditional(unet, context), sched, *guidance_interval)
  latents = sample(model_fn, sampler, x_T, key)
  if vae is None:
    return latents
  images = decode(vae, latents)
  return (images, latents) if return_latents else images


def _guided(unet, context, uncond, guidance_scale, rescale=0.0):
  if uncond is None:
    return guidance.text_conditional(unet, context)
  return guidance.classifier_free_context(unet, context, uncond, guidance_scale, rescale=rescale)


# --- editing in latent space ----------------------------------------------------------------

# how the init image becomes latents: a posterior sample (diffusers' img2img default,
# ``retrieve_latents(..., sample_mode="sample")``) or the posterior mean
POSTERIORS = ("sample", "mean")
# the posterior sample's sub-key; ddx.edit's SDEdit / inpainting use fold_in(key, 0..3)
ENCODE_KEY = 4


@functools.partial(jax.jit, static_argnums=0)
def _encode_sample(graphdef, state, x, key):
  return nnx.merge(graphdef, state).encode_latents(x, key)


@functools.partial(jax.jit, static_argnums=0)
def _encode_mean(graphdef, state, x):
  return nnx.merge(graphdef, state).encode_latents(x)


def encode(vae, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """Images [B, H, W, C] in [-1, 1] -> scaled latents ``(z - shift) * scale``, jitted; z is
  ``mean + std * normal(key)`` with a key, the posterior mean without."""
  graphdef, state = nnx.split(vae)
  if key is None:
    return _encode_mean(graphdef, state, images)
  return _encode_sample(graphdef, state, images, key)


def check_image(unet, vae, image) -> jax.Array:
  """An init image's shape and dtype (one-line ValueError); returns it as float32."""
  image = jnp.asarray(image)
  c = vae.in_channels
  if image.ndim != 4 or image.shape[-1] != c:
    raise ValueError(
      f"image: expected images [B, H, W, {c}] (the VAE's in_channels) in [-1, 1], got shape {tuple(image.shape)}"
    )
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"image: expected a floating dtype (values in [-1, 1]), got {image.dtype}")
  f = vae.downscale
  div = f * 2 ** (unet.num_levels - 1)
  if image.shape[1] % div or image.shape[2] % div:
    raise ValueError(
      f"image: height and width must be divisible by {div} (the VAE's factor {f} x "
      f"the U-Net's {div // f}), got {tuple(image.shape[1:3])}"
    )
  return image.astype(jnp.float32)


def _prepare(unet, vae, context, uncond_context, sampler, image, key, posterior):
  """Checks shared by `img2img` and `inpaint` (before anything compiles); returns the arrays
  and the shape of the latents."""
  if vae is None:
    raise ValueError("vae: img2img and inpainting need the autoencoder to encode the image, got None")
  if posterior not in POSTERIORS:
    raise ValueError(f"posterior: must be one of {POSTERIORS}, got {posterior!r}")
  if key is None:
    raise ValueError("key: img2img and inpainting need a PRNG key (the forward noise), got None")
  edit.levels(sampler)  # DDPM / DDIM only: one line naming the sampler otherwise
  image = check_image(unet, vae, image)
  f = vae.downscale
  context = jnp.asarray(context, jnp.float32)
  uncond = None if uncond_context is None else jnp.asarray(uncond_context, jnp.float32)
  if context.ndim >= 1 and context.shape[0] != image.shape[0]:
    raise ValueError(f"image: batch {image.shape[0]} differs from the context's batch {context.shape[0]}")
  shape = (image.shape[0], image.shape[1] // f, image.shape[2] // f, vae.latent_channels)
  check_inputs(unet, vae, context, uncond, jax.ShapeDtypeStruct(shape, jnp.float32))
  return context, uncond, image.astype(jnp.float32), shape


def _encode_key(key, posterior):
  return None if posterior == "mean" else jax.random.fold_in(key, ENCODE_KEY)


def img2img(
  unet,
  vae,
  context,
  uncond_context,
  sampler,
  image,
  strength: float,
  key: jax.Array,
  guidance_scale: float = 7.5,
  *,
  posterior: str = "sample",
  return_latents: bool = False,
):
  """SDEdit in latent space (diffusers' StableDiffusionImg2ImgPipeline).

  The image is encoded to scaled latents z0 (``posterior``: "sample" draws
  ``mean + std * normal(fold_in(key, ENCODE_KEY))``, "mean" takes the mean), then
  `ddx.edit.sdedit` runs with the guided U-Net: z0 is noised to the level of the first call
  ``edit.sdedit_start(N, strength)`` (the last ``int(N * strength)`` grid points run) with
  ``normal(fold_in(key, 0))``, a stochastic sampler draws from ``fold_in(key, 1)``; the
  result is decoded. ``strength < 1 / N`` runs no step (the decoded z0 is returned).

  Args:
    unet, vae, context, uncond_context, guidance_scale: as for `generate`.
    sampler: a DDPM or DDIM sampler, e.g. ``sd_sampler("ddim", 50)``.
    image: float [B, H, W, C] in [-1, 1], H and W divisible by the VAE factor times the
      U-Net's downsampling; B equal to the context's batch.
    strength: in (0, 1].
    key: PRNG key (required: the forward noise).

  Returns:
    images float32 [B, H, W, C], or ``(images, latents)``.
  """
  context, uncond, image, _ = _prepare(unet, vae, context, uncond_context, sampler, image, key, posterior)
  edit.sdedit_start(len(edit.levels(sampler)[0]) - 1, strength)  # the strength's range, before compiling
  z0 = encode(vae, image, _encode_key(key, posterior))
  latents = edit.sdedit(_guided(unet, context, uncond, guidance_scale), sampler, z0, strength, key)
  images = decode(vae, latents)
  return (images, latents) if return_latents else images


def latent_mask(mask, image_shape: tuple, factor: int) -> np.ndarray:
  """A pixel mask (1 = keep, 0 = fill) [H, W] or [B, H, W] -> float32 [.., H/f, W/f].

  A latent is kept only if every pixel of its f x f block is kept: any pixel to be filled
  makes its latent free (so every pixel to be filled is generated; diffusers' legacy inpaint
  pipeline resizes with PIL's nearest neighbour instead, which can keep a latent whose block
  is partly to be filled).
  """
  m = np.asarray(mask)
  b, h, w = image_shape[:3]
  if m.shape not in ((h, w), (b, h, w)):
    raise ValueError(f"mask: expected shape {(h, w)} or {(b, h, w)} (the image's, 1 = keep, 0 = fill), got {m.shape}")
  if not np.all((m == 0) | (m == 1)):
    raise ValueError(f"mask: must be binary (1 = keep, 0 = fill), got values {np.unique(m)[:6].tolist()}")
  m = m.astype(np.float32).reshape(m.shape[:-2] + (h // factor, factor, w // factor, factor))
  return m.min(axis=(-3, -1))


def inpaint(
  unet,
  vae,
  context,
  uncond_context,
  sampler,
  image,
  mask,
  key: jax.Array,
  guidance_scale: float = 7.5,
  *,
  posterior: str = "sample",
  paste: bool = False,
  return_latents: bool = False,
):
  """Inpainting by replacement in latent space (the step rule of `ddx.edit.inpaint`).

  The image is encoded as in `img2img`; the pixel mask goes to the latent resolution with
  `latent_mask` (a latent is kept only if its whole block is). `ddx.edit.inpaint` then runs
  with the guided U-Net on the latents: x_T is ``normal(fold_in(key, 0))`` with the kept
  latents at the first level, and after every call the kept latents are replaced by z0
  forward-noised to the new level (keys ``fold_in(key, 1..3)`` as documented there).

  Args:
    image: float [B, H, W, C] in [-1, 1] (as for `img2img`).
    mask: [H, W] or [B, H, W], 1 = keep, 0 = fill (pixel resolution).
    paste: paste the input pixels back where the mask is 1 after decoding (the VAE does not
      reproduce them exactly); off by default, as in diffusers' pipelines.
    the rest: as for `img2img`.

  Returns:
    images float32 [B, H, W, C], or ``(images, latents)``.
  """
  context, uncond, image, shape = _prepare(unet, vae, context, uncond_context, sampler, image, key, posterior)
  m = latent_mask(mask, image.shape, vae.downscale)
  lm = np.ascontiguousarray(np.broadcast_to(m[..., None], shape))
  z0 = encode(vae, image, _encode_key(key, posterior))
  latents = edit.inpaint(_guided(unet, context, uncond, guidance_scale), sampler, z0, lm, key)
  images = decode(vae, latents)
  if paste:
    pm = jnp.asarray(np.asarray(mask, np.float32)[..., None])
    images = pm * image + (1.0 - pm) * images
  return (images, latents) if return_latents else images
