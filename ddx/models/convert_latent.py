"""Import the latent-diffusion components from local diffusers / transformers folders.

* `autoencoder_from_diffusers`: a diffusers ``AutoencoderKL`` folder -> `AutoencoderKL`.
* `unet_cond_from_diffusers`: a diffusers ``UNet2DConditionModel`` folder -> `UNetCond`
  (also reached through `ddx.models.from_diffusers`, which dispatches on ``_class_name``).
* `clip_text_from_transformers`: a transformers ``CLIPTextModel`` folder -> `CLIPTextEncoder`.

Each reads ``config.json`` and safetensors weights only, and fails with one line naming an
unsupported config key (and its value) or a missing / unexpected / ill-shaped tensor. Config
keys that only affect speed or memory in the reference (``force_upcast``, ``upcast_attention``,
``sample_size``) are accepted and ignored; ddx computes softmax and norms in float32 anyway.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from ddx.models import torch_import as ti
from ddx.models.autoencoder import AutoencoderKL, validate_autoencoder_kwargs

CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",)
TRANSFORMERS_WEIGHTS = ("model.safetensors",)

# diffusers' pre-0.14 attention names, still found in some VAE checkpoints.
_LEGACY_ATTN = ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                (".to_out.0.", ".proj_attn."))


def _unsupported(what: str, key: str, value: Any, why: str = "") -> ValueError:
  return ValueError(f"{key}: unsupported {what} config value {value!r}" + (f" ({why})" if why else ""))


def component_dir(path: str | os.PathLike, sub: str) -> str:
  """``path`` if it holds config.json, else ``path/sub`` if that does; else FileNotFoundError."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, CONFIG)):
    return path
  if os.path.isfile(os.path.join(path, sub, CONFIG)):
    return os.path.join(path, sub)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{sub}: folder not found: {path}")
  raise FileNotFoundError(f"{sub}: no {CONFIG} in {path} (nor in {os.path.join(path, sub)})")


def _merge(config: Mapping, defaults: Mapping, cls: str, what: str) -> dict:
  got = config.get("_class_name", cls)
  if got != cls:
    raise _unsupported(what, "_class_name", got, f"expected {cls}")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
  if unknown:
    raise _unsupported(what, unknown[0], config[unknown[0]], "unknown config key")
  c = dict(defaults)
  c.update({k: v for k, v in config.items() if not k.startswith("_")})
  return c


def _require(c: Mapping, what: str, key: str, allowed: tuple) -> None:
  v = c[key]
  if v not in allowed or isinstance(v, bool) != isinstance(allowed[0], bool):
    raise _unsupported(what, key, v, f"supported: {list(allowed)}")


# ------------------------------------------------------------------ AutoencoderKL

_VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def diffusers_to_autoencoder_kwargs(config: Mapping[str, Any]) -> dict:
  """`AutoencoderKL` kwargs for a diffusers AutoencoderKL config (one-line ValueError)."""
  what = "diffusers AutoencoderKL"
  c = _merge(config, _VAE_DEFAULTS, "AutoencoderKL", what)
  _require(c, what, "act_fn", ("silu", "swish"))
  _require(c, what, "latents_mean", (None,))
  _require(c, what, "latents_std", (None,))
  boc = list(c["block_out_channels"])
  for key, block in (("down_block_types", "DownEncoderBlock2D"),
                     ("up_block_types", "UpDecoderBlock2D")):
    types = list(c[key])
    if len(types) != len(boc):
      raise _unsupported(what, key, c[key], "length differs from block_out_channels")
    bad = [b for b in types if b != block]
    if bad:
      raise _unsupported(what, key, bad[0], f"supported: {block}")
  kwargs = dict(in_channels=c["in_channels"], out_channels=c["out_channels"],
                block_out_channels=boc, layers_per_block=c["layers_per_block"],
                latent_channels=c["latent_channels"], norm_num_groups=c["norm_num_groups"],
                scaling_factor=c["scaling_factor"], shift_factor=c["shift_factor"],
                use_quant_conv=c["use_quant_conv"], use_post_quant_conv=c["use_post_quant_conv"],
                mid_block_add_attention=c["mid_block_add_attention"], dtype=None,
                param_dtype="float32")
  try:
    return validate_autoencoder_kwargs(**kwargs)
  except ValueError as e:
    raise ValueError(f"diffusers AutoencoderKL config gives an invalid ddx AutoencoderKL: {e}") from None


def autoencoder_from_diffusers(path: str | os.PathLike, **overrides) -> AutoencoderKL:
  """Load a diffusers AutoencoderKL folder (or a pipeline folder with ``vae/``).

  ``overrides``: AutoencoderKL kwargs such as ``dtype="bfloat16"``.
  """
  folder = component_dir(path, "vae")
  kwargs = diffusers_to_autoencoder_kwargs(ti.read_json(os.path.join(folder, CONFIG), "vae"))
  kwargs.update(overrides)
  kwargs = validate_autoencoder_kwargs(**kwargs)
  module, abstract = ti.abstract_params(lambda: AutoencoderKL(**kwargs, rngs=ti.nnx.Rngs(0)))
  state = ti.read_safetensors(folder, DIFFUSERS_WEIGHTS, "vae")
  params = ti.convert_state(state, abstract, what="vae", subs=[(".to_out.", ".to_out.0.")],
                            legacy=_LEGACY_ATTN)
  return ti.load_params(module, params, kwargs["param_dtype"])
