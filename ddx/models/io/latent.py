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

import dataclasses
import os
from typing import Any, Mapping

from ddx.models.autoencoder import AutoencoderKL
from ddx.models.build import abstract, param_shapes, with_params
from ddx.models.clip_text import CLIPTextEncoder
from ddx.models.configs import CLIP_ACTIVATIONS, AutoencoderConfig, CLIPTextConfig, UNetCondConfig
from ddx.models.io import torch_state as ti
from ddx.models.unet_cond import UNetCond

CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",)
TRANSFORMERS_WEIGHTS = ("model.safetensors",)


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
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ["DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D"],
  "block_out_channels": [64],
  "layers_per_block": 1,
  "act_fn": "silu",
  "latent_channels": 4,
  "norm_num_groups": 32,
  "sample_size": 32,
  "scaling_factor": 0.18215,
  "shift_factor": None,
  "latents_mean": None,
  "latents_std": None,
  "force_upcast": True,
  "use_quant_conv": True,
  "use_post_quant_conv": True,
  "mid_block_add_attention": True,
}


def diffusers_to_autoencoder_config(config: Mapping[str, Any]) -> AutoencoderConfig:
  """The `AutoencoderConfig` of a diffusers AutoencoderKL config (one-line ValueError)."""
  what = "diffusers AutoencoderKL"
  c = _merge(config, _VAE_DEFAULTS, "AutoencoderKL", what)
  _require(c, what, "act_fn", ("silu", "swish"))
  _require(c, what, "latents_mean", (None,))
  _require(c, what, "latents_std", (None,))
  boc = list(c["block_out_channels"])
  for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    types = list(c[key])
    if len(types) != len(boc):
      raise _unsupported(what, key, c[key], "length differs from block_out_channels")
    bad = [b for b in types if b != block]
    if bad:
      raise _unsupported(what, key, bad[0], f"supported: {block}")
  try:
    return AutoencoderConfig(
      in_channels=c["in_channels"],
      out_channels=c["out_channels"],
      block_out_channels=boc,
      layers_per_block=c["layers_per_block"],
      latent_channels=c["latent_channels"],
      norm_num_groups=c["norm_num_groups"],
      scaling_factor=c["scaling_factor"],
      shift_factor=c["shift_factor"],
      use_quant_conv=c["use_quant_conv"],
      use_post_quant_conv=c["use_post_quant_conv"],
      mid_block_add_attention=c["mid_block_add_attention"],
    )
  except ValueError as e:
    raise ValueError(f"diffusers AutoencoderKL config gives an invalid ddx AutoencoderKL: {e}") from None


def autoencoder_from_diffusers(path: str | os.PathLike, **overrides) -> AutoencoderKL:
  """Load a diffusers AutoencoderKL folder (or a pipeline folder with ``vae/``).

  ``overrides``: `AutoencoderConfig` fields such as ``dtype="bfloat16"``.
  """
  folder = component_dir(path, "vae")
  config = diffusers_to_autoencoder_config(ti.read_json(os.path.join(folder, CONFIG), "vae"))
  module = abstract(config.replace(**overrides))
  state = ti.read_safetensors(folder, DIFFUSERS_WEIGHTS, "vae")
  subs = [(".to_out.", ".to_out.0.")]
  return with_params(
    module, ti.convert_state(state, param_shapes(module), what="vae", subs=subs, legacy=ti.LEGACY_ATTN)
  )


# ------------------------------------------------------------------ UNet2DConditionModel

_UNET_DEFAULTS = {
  "sample_size": None,
  "in_channels": 4,
  "out_channels": 4,
  "center_input_sample": False,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
  "only_cross_attention": False,
  "block_out_channels": [320, 640, 1280, 1280],
  "layers_per_block": 2,
  "downsample_padding": 1,
  "mid_block_scale_factor": 1,
  "dropout": 0.0,
  "act_fn": "silu",
  "norm_num_groups": 32,
  "norm_eps": 1e-5,
  "cross_attention_dim": 1280,
  "transformer_layers_per_block": 1,
  "reverse_transformer_layers_per_block": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "attention_head_dim": 8,
  "num_attention_heads": None,
  "dual_cross_attention": False,
  "use_linear_projection": False,
  "class_embed_type": None,
  "addition_embed_type": None,
  "addition_time_embed_dim": None,
  "num_class_embeds": None,
  "upcast_attention": False,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "projection_class_embeddings_input_dim": None,
  "attention_type": "default",
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "cross_attention_norm": None,
  "addition_embed_type_num_heads": 64,
}

# Keys that must hold one of these values (anything else is another architecture).
_UNET_REQUIRED = {
  "center_input_sample": (False,),
  "mid_block_type": ("UNetMidBlock2DCrossAttn",),
  "mid_block_scale_factor": (1,),
  "dropout": (0,),
  "act_fn": ("silu", "swish"),
  "reverse_transformer_layers_per_block": (None,),
  "encoder_hid_dim": (None,),
  "encoder_hid_dim_type": (None,),
  "num_attention_heads": (None,),
  "dual_cross_attention": (False,),
  "class_embed_type": (None, "timestep"),
  "addition_embed_type": (None,),
  "addition_time_embed_dim": (None,),
  "resnet_time_scale_shift": ("default",),
  "resnet_skip_time_act": (False,),
  "resnet_out_scale_factor": (1,),
  "time_embedding_type": ("positional",),
  "time_embedding_dim": (None,),
  "time_embedding_act_fn": (None,),
  "timestep_post_act": (None,),
  "time_cond_proj_dim": (None,),
  "conv_in_kernel": (3,),
  "conv_out_kernel": (3,),
  "projection_class_embeddings_input_dim": (None,),
  "attention_type": ("default",),
  "class_embeddings_concat": (False,),
  "mid_block_only_cross_attention": (None, False),
  "cross_attention_norm": (None,),
}

_UNET_SUBS = ((".ff.proj.", ".ff.net.0.proj."), (".ff.out.", ".ff.net.2."))


def diffusers_to_unet_cond_config(config: Mapping[str, Any]) -> UNetCondConfig:
  """The `UNetCondConfig` of a diffusers UNet2DConditionModel config (one-line ValueError)."""
  what = "diffusers UNet2DConditionModel"
  c = _merge(config, _UNET_DEFAULTS, "UNet2DConditionModel", what)
  for key, allowed in _UNET_REQUIRED.items():
    _require(c, what, key, allowed)
  boc = list(c["block_out_channels"])
  down, up = list(c["down_block_types"]), list(c["up_block_types"])
  for key, types, ok in (
    ("down_block_types", down, ("CrossAttnDownBlock2D", "DownBlock2D")),
    ("up_block_types", up, ("CrossAttnUpBlock2D", "UpBlock2D")),
  ):
    if len(types) != len(boc):
      raise _unsupported(what, key, c[key], "length differs from block_out_channels")
    bad = [b for b in types if b not in ok]
    if bad:
      raise _unsupported(what, key, bad[0], f"supported: {', '.join(ok)}")
  oca = c["only_cross_attention"]
  if oca if isinstance(oca, bool) else any(oca):
    raise _unsupported(what, "only_cross_attention", oca, "supported: False")
  cad = c["cross_attention_dim"]
  if not isinstance(cad, int) or isinstance(cad, bool):
    raise _unsupported(what, "cross_attention_dim", cad, "only one int for all blocks")
  tl = c["transformer_layers_per_block"]
  if not isinstance(tl, int) and any(not isinstance(v, int) for v in tl):
    raise _unsupported(what, "transformer_layers_per_block", tl, "nested lists")
  heads = c["attention_head_dim"]  # head counts, see ddx.models.unet_cond
  if heads is None:
    raise _unsupported(what, "attention_head_dim", heads, "must give the heads per block")
  if c["norm_num_groups"] is None:
    raise _unsupported(what, "norm_num_groups", None)
  if c["class_embed_type"] == "timestep" and c["num_class_embeds"] is not None:
    raise _unsupported(what, "num_class_embeds", c["num_class_embeds"], "not used with class_embed_type='timestep'")
  try:
    return UNetCondConfig(
      in_channels=c["in_channels"],
      out_channels=c["out_channels"],
      block_out_channels=boc,
      down_cross=[b == "CrossAttnDownBlock2D" for b in down],
      up_cross=[b == "CrossAttnUpBlock2D" for b in up],
      layers_per_block=c["layers_per_block"],
      transformer_layers=tl,
      num_heads=heads,
      cross_attention_dim=cad,
      use_linear_projection=c["use_linear_projection"],
      norm_num_groups=c["norm_num_groups"],
      norm_eps=c["norm_eps"],
      flip_sin_to_cos=c["flip_sin_to_cos"],
      freq_shift=c["freq_shift"],
      downsample_padding=c["downsample_padding"],
      class_embed_type=c["class_embed_type"],
      num_class_embeds=c["num_class_embeds"],
    )
  except ValueError as e:
    raise ValueError(f"diffusers UNet2DConditionModel config gives an invalid ddx UNetCond: {e}") from None


def unet_cond_from_diffusers(path: str | os.PathLike, **overrides) -> UNetCond:
  """Load a diffusers UNet2DConditionModel folder (or a pipeline folder with ``unet/``).

  ``overrides``: `UNetCondConfig` fields such as ``dtype="bfloat16"``, ``remat=True``.
  """
  folder = component_dir(path, "unet")
  config = diffusers_to_unet_cond_config(ti.read_json(os.path.join(folder, CONFIG), "unet"))
  module = abstract(config.replace(**overrides))
  state = ti.read_safetensors(folder, DIFFUSERS_WEIGHTS, "unet")
  return with_params(module, ti.convert_state(state, param_shapes(module), what="unet", subs=_UNET_SUBS))


# ------------------------------------------------------------------ CLIPTextModel

# The architecture keys of a transformers CLIPTextConfig: CLIPTextConfig's fields without the
# dtypes (ddx's names and defaults are transformers').
_CLIP_KEYS = tuple(f.name for f in dataclasses.fields(CLIPTextConfig) if f.name not in ("dtype", "param_dtype"))


def transformers_to_clip_config(config: Mapping[str, Any]) -> CLIPTextConfig:
  """The `CLIPTextConfig` of a transformers CLIPTextConfig dict (one-line ValueError).

  transformers configs carry many generic keys (output flags, dtype, ids of special tokens);
  only the architecture keys (`_CLIP_KEYS`) are read, and the class must be a plain CLIPTextModel.
  """
  what = "transformers CLIPTextModel"
  archs = config.get("architectures") or ["CLIPTextModel"]
  if list(archs) != ["CLIPTextModel"]:
    raise _unsupported(what, "architectures", archs, "supported: ['CLIPTextModel']")
  mt = config.get("model_type", "clip_text_model")
  if mt != "clip_text_model":
    raise _unsupported(what, "model_type", mt, "supported: clip_text_model")
  c = {k: config[k] for k in _CLIP_KEYS if k in config}
  act = c.get("hidden_act", "quick_gelu")
  if act not in CLIP_ACTIVATIONS:
    raise _unsupported(what, "hidden_act", act, f"supported: {', '.join(CLIP_ACTIVATIONS)}")
  eos = c.get("eos_token_id", 2)
  if not isinstance(eos, int) or isinstance(eos, bool):
    raise _unsupported(what, "eos_token_id", eos, "must be one int")
  try:
    return CLIPTextConfig.from_json(c)
  except ValueError as e:
    raise ValueError(f"transformers CLIPTextModel config gives an invalid ddx CLIPTextEncoder: {e}") from None


def clip_text_from_transformers(path: str | os.PathLike, **overrides) -> CLIPTextEncoder:
  """Load a transformers CLIPTextModel folder (or a pipeline folder with ``text_encoder/``).

  Both weight layouts are accepted: names with the ``text_model.`` prefix (transformers < 5
  and most published checkpoints) and without it (transformers 5's CLIPTextModel).
  A stored ``position_ids`` buffer is ignored.
  """
  folder = component_dir(path, "text_encoder")
  config = transformers_to_clip_config(ti.read_json(os.path.join(folder, CONFIG), "text_encoder"))
  module = abstract(config.replace(**overrides))
  state = ti.read_safetensors(folder, TRANSFORMERS_WEIGHTS, "text_encoder")
  prefix = "text_model." if any(k.startswith("text_model.") for k in state) else ""
  params = ti.convert_state(
    state,
    param_shapes(module),
    what="text_encoder",
    prefix=prefix,
    ignore=lambda k: k.endswith("embeddings.position_ids"),
  )
  return with_params(module, params)
