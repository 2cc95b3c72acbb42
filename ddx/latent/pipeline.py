"""Load a local diffusers-format Stable Diffusion pipeline folder and generate images from text.

A pipeline folder holds ``model_index.json`` and one subfolder per component::

    unet/          UNet2DConditionModel  (config.json + diffusion_pytorch_model.safetensors)
    vae/           AutoencoderKL         (config.json + diffusion_pytorch_model.safetensors)
    text_encoder/  CLIPTextModel         (config.json + model.safetensors)
    tokenizer/     CLIPTokenizer         (vocab.json, merges.txt, tokenizer_config.json)
    scheduler/     scheduler_config.json (optional: the training schedule; SD's if absent)

``safety_checker`` / ``feature_extractor`` entries are not loaded (ddx does not run the
safety checker). Any other component, a missing one, or an unsupported class stops with one
line naming it. Nothing is downloaded: the weights are the user's. Tokenisation uses the
``transformers`` CLIPTokenizer (a test/optional dependency); the models need only token ids.

    pipe = ddx.latent.pipeline.load("path/to/stable-diffusion-v1-5")
    images = pipe.txt2img(["a photo of a cat"], sampler="plms", steps=50, guidance=7.5,
                          key=jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx import edit, latent, samplers, schedules, storage
from ddx.models.io import diffusers as convert
from ddx.models.io import latent as convert_latent
from ddx.models.io import torch_state as torch_import

__all__ = ["load", "Pipeline", "read_model_index", "COMPONENTS"]

MODEL_INDEX = "model_index.json"
# component -> (library, accepted class names)
COMPONENTS = {
  "unet": ("diffusers", ("UNet2DConditionModel",)),
  "vae": ("diffusers", ("AutoencoderKL",)),
  "text_encoder": ("transformers", ("CLIPTextModel",)),
  "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
}
IGNORED = ("scheduler", "safety_checker", "feature_extractor", "image_encoder")


@dataclasses.dataclass
class Pipeline:
  """The loaded components of a Stable Diffusion pipeline folder."""

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  diffusion: dict  # ddx "diffusion" settings from scheduler_config.json
  scheduler: dict  # the raw scheduler config ({} if absent)
  path: str
  unet_sample_size: int | None = None  # latent size from the U-Net config (image = x vae.downscale)

  @property
  def max_length(self) -> int:
    return int(min(self.text_encoder.max_length, self.tokenizer.model_max_length))

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> int32 [B, max_length] token ids, padded as the tokenizer pads.

    A prompt longer than the text encoder's context raises (never silently truncated).
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    n = self.max_length
    rows = []
    for p in prompts:
      ids = self.tokenizer(p, truncation=False).input_ids
      if len(ids) > n:
        raise ValueError(
          f"prompt: {len(ids)} tokens (with start/end) exceed the text encoder's context of {n}: {p[:40]!r}..."
        )
      rows.append(self.tokenizer(p, padding="max_length", max_length=n).input_ids)
    return np.asarray(rows, np.int32)

  def encode(self, ids) -> jax.Array:
    """Token ids [B, L] -> text embeddings float32 [B, L, D] (last hidden state)."""
    self.text_encoder.check_ids(jnp.asarray(ids))
    return _encode(*nnx.split(self.text_encoder), jnp.asarray(ids, jnp.int32))

  def schedule(self) -> schedules.Schedule:
    """The U-Net's training schedule, from the scheduler config."""
    d = self.diffusion
    return schedules.make(
      d["beta_schedule"],
      d["num_timesteps"],
      beta_start=d["beta_start"],
      beta_end=d["beta_end"],
      rescale_zero_snr=d["rescale_zero_snr"],
    )

  def sampler(self, name: str, steps: int, **kwargs):
    """A ddx sampler on this pipeline's schedule and its scheduler's grid settings."""
    d, s = self.diffusion, self.scheduler
    sched = self.schedule()
    key = samplers.canonical(name)
    grid = dict(spacing=s.get("timestep_spacing", "leading"), steps_offset=int(s.get("steps_offset", 0)))
    extra = {
      "ddim": dict(
        grid, set_alpha_to_one=bool(s.get("set_alpha_to_one", False)), clip_sample=bool(s.get("clip_sample", False))
      ),
      "plms": dict(grid, set_alpha_to_one=bool(s.get("set_alpha_to_one", False))),
      "ddpm": dict(grid, clip_sample=bool(s.get("clip_sample", False))),
      # the σ-space samplers on the folder's timestep grid, as diffusers' Euler-family
      # schedulers built from this scheduler config would be
      **{n: dict(grid) for n in samplers.SIGMA_NAMES},
    }.get(key, {})
    if extra.get("spacing") != "leading":
      extra.pop("steps_offset", None)
    return samplers.make(name, sched, steps, prediction=d["prediction"], **{**extra, **kwargs})

  def latent_shape(self, num: int, height: int | None, width: int | None) -> tuple:
    f = self.vae.downscale
    size = self.unet_sample_size * f if self.unet_sample_size else None
    height, width = height or size, width or size
    if height is None or width is None:
      raise ValueError("height: the U-Net config has no sample_size; pass height and width")
    div = f * 2 ** (self.unet.num_levels - 1)
    for name, v in (("height", height), ("width", width)):
      if v < 1 or v % div:
        raise ValueError(f"{name}: must be a positive multiple of {div}, got {v}")
    return (num, height // f, width // f, self.unet.in_channels)

  def contexts(self, prompts: Sequence[str], negative_prompt: str, guidance: float):
    """``(context, uncond_context)`` text embeddings; no unconditional one when guidance is 1."""
    context = self.encode(self.tokenize(list(prompts)))
    uncond = None
    if guidance != 1.0:
      uncond = self.encode(self.tokenize([negative_prompt] * len(prompts)))
    return context, uncond

  def txt2img(
    self,
    prompts: Sequence[str],
    *,
    negative_prompt: str = "",
    sampler: str = "plms",
    steps: int = 50,
    guidance: float = 7.5,
    key: jax.Array,
    height: int | None = None,
    width: int | None = None,
    x_T: jax.Array | None = None,
    eta: float | None = None,
    sigmas: str | None = None,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
  ):
    """Generate one image per prompt; returns float32 [B, H, W, 3] in about [-1, 1].

    The initial latents are ``normal(fold_in(key, 0))`` unless ``x_T`` is given; stochastic
    samplers draw their noise from ``fold_in(key, 1)``. ``guidance=1`` skips the
    unconditional branch. ``sigmas`` picks a noise-level grid for the samplers that take one;
    ``guidance_rescale`` and ``guidance_interval`` as for `ddx.latent.generate`.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    kw = ({} if eta is None else {"eta": eta}) | ({} if sigmas is None else {"sigmas": sigmas})
    smp = self.sampler(sampler, steps, **kw)  # bad names / steps fail before any model work
    context, uncond = self.contexts(prompts, negative_prompt, guidance)
    if x_T is None:
      x_T = jax.random.normal(jax.random.fold_in(key, 0), self.latent_shape(len(prompts), height, width), jnp.float32)
    return latent.generate(
      self.unet,
      self.vae,
      context,
      uncond,
      smp,
      x_T,
      jax.random.fold_in(key, 1),
      guidance_scale=guidance,
      guidance_rescale=guidance_rescale,
      guidance_interval=guidance_interval,
      sched=self.schedule(),
    )

  def img2img(self, prompts: Sequence[str], image, *, strength: float = 0.75, key: jax.Array, **kwargs):
    """SDEdit of ``image`` under each prompt (`ddx.latent.img2img`; keys and conventions there).

    image: float [H, W, 3] (used for every prompt) or [B, H, W, 3] in [-1, 1]; ``kwargs``:
    negative_prompt, sampler ("ddim" default; DDPM / DDIM only), steps, guidance, eta,
    posterior. Returns float32 [B, H, W, 3].
    """
    return self._edit(prompts, image, strength=strength, mask=None, key=key, **kwargs)

  def inpaint(self, prompts: Sequence[str], image, mask, *, key: jax.Array, paste: bool = False, **kwargs):
    """Inpainting of ``image`` under each prompt (`ddx.latent.inpaint`): mask [H, W] or
    [B, H, W], 1 = keep, 0 = fill; other arguments as for `img2img` (no strength: the whole
    grid runs)."""
    return self._edit(prompts, image, strength=None, mask=mask, key=key, paste=paste, **kwargs)

  def _edit(
    self,
    prompts,
    image,
    *,
    strength,
    mask,
    key,
    negative_prompt: str = "",
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 7.5,
    eta: float | None = None,
    posterior: str = "sample",
    paste: bool = False,
  ):
    if isinstance(prompts, str):
      prompts = [prompts]
    kw = {} if eta is None else {"eta": eta}
    smp = self.sampler(sampler, steps, **kw)
    edit.levels(smp)  # DDPM / DDIM only
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
      image = np.broadcast_to(image[None], (len(prompts),) + image.shape)
    # everything that can be checked from shapes, before the text encoder compiles
    latent.check_image(self.unet, self.vae, image)
    if mask is None:
      edit.sdedit_start(steps, strength)
    else:
      latent.latent_mask(mask, image.shape, self.vae.downscale)
    context, uncond = self.contexts(prompts, negative_prompt, guidance)
    if mask is None:
      return latent.img2img(
        self.unet, self.vae, context, uncond, smp, image, strength, key, guidance_scale=guidance, posterior=posterior
      )
    return latent.inpaint(
      self.unet,
      self.vae,
      context,
      uncond,
      smp,
      image,
      mask,
      key,
      guidance_scale=guidance,
      posterior=posterior,
      paste=paste,
    )


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)[0]


def read_model_index(path: str) -> dict:
  """model_index.json, with every component entry checked; one-line errors naming it."""
  index = torch_import.read_json(os.path.join(path, MODEL_INDEX), "pipeline")
  for name, entry in index.items():
    if name.startswith("_") or not isinstance(entry, list):
      continue  # _class_name, _diffusers_version, flags such as requires_safety_checker
    if name not in COMPONENTS and name not in IGNORED:
      raise ValueError(f"{name}: unsupported pipeline component {entry!r} (ddx loads {', '.join(COMPONENTS)})")
  for name, (lib, classes) in COMPONENTS.items():
    entry = index.get(name)
    if entry is None:
      raise ValueError(f"{name}: missing from {os.path.join(path, MODEL_INDEX)}")
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] not in classes:
      raise ValueError(
        f"{name}: unsupported component class {entry!r} (supported: {', '.join(f'[{lib!r}, {c!r}]' for c in classes)})"
      )
    if not os.path.isdir(os.path.join(path, name)):
      raise FileNotFoundError(f"{name}: missing component folder {os.path.join(path, name)}")
  return index


def load_tokenizer(folder: str):
  try:
    import transformers  # noqa: PLC0415 -- optional extra, for the tokenizer only
  except ImportError:
    raise ImportError(
      "tokenizer: the transformers package is needed to tokenize prompts "
      "(pip install transformers); the models themselves run from token ids"
    ) from None
  try:
    return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  except Exception as e:  # transformers raises many types; keep one line
    raise ValueError(
      f"tokenizer: cannot load a CLIPTokenizer from {folder} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    ) from None


def load(path: str | os.PathLike, *, dtype: Any = None) -> Pipeline:
  """Load a pipeline folder (see the module docstring); ``dtype="bfloat16"`` for bf16 compute.
  A folder on a bucket (``gs://...``) is copied to a temporary local folder first."""
  path = os.fspath(path)
  if storage.is_remote(path):
    with storage.local_dir(path, "pipeline") as local:
      return dataclasses.replace(load(local, dtype=dtype), path=storage.normalize(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pipeline: folder not found: {path}")
  read_model_index(path)
  over = {} if dtype is None else {"dtype": dtype}
  unet = convert_latent.unet_cond_from_diffusers(os.path.join(path, "unet"), **over)
  unet_cfg = torch_import.read_json(os.path.join(path, "unet", "config.json"), "unet")
  vae = convert_latent.autoencoder_from_diffusers(os.path.join(path, "vae"), **over)
  text = convert_latent.clip_text_from_transformers(os.path.join(path, "text_encoder"), **over)
  if text.hidden_size != unet.cross_attention_dim:
    raise ValueError(
      f"text_encoder: hidden_size {text.hidden_size} differs from the U-Net's "
      f"cross_attention_dim {unet.cross_attention_dim}"
    )
  if vae.latent_channels != unet.in_channels:
    raise ValueError(
      f"vae: latent_channels {vae.latent_channels} differ from the U-Net's in_channels {unet.in_channels}"
    )
  tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
  sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
  scheduler = torch_import.read_json(sched_file, "scheduler") if os.path.isfile(sched_file) else {}
  if scheduler:
    diffusion = convert.diffusers_scheduler_to_diffusion(scheduler)
  else:
    diffusion = dict(
      num_timesteps=1000,
      beta_schedule="scaled_linear",
      beta_start=0.00085,
      beta_end=0.012,
      prediction="eps",
      rescale_zero_snr=False,
    )
  size = unet_cfg.get("sample_size")
  size = size[0] if isinstance(size, (list, tuple)) else size
  return Pipeline(
    unet=unet,
    vae=vae,
    text_encoder=text,
    tokenizer=tokenizer,
    diffusion=diffusion,
    scheduler=scheduler,
    path=path,
    unet_sample_size=size,
  )
