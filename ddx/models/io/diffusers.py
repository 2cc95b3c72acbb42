"""Import diffusers ``UNet2DModel`` checkpoints (the google/ddpm-* family) into `ddx.models.UNet`.

Only safetensors weights are read (`ddx.models.io.torch_state.read_safetensors`; ``.bin``
pickles are never loaded). Supported: block types DownBlock2D, AttnDownBlock2D, UpBlock2D,
AttnUpBlock2D with the UNetMidBlock2D mid block, positional time embedding, the "default"
resnet time conditioning, conv resampling, no class embedding. Anything else raises a
ValueError naming the config key and value.

Weight layout: torch conv weights [O, I, kh, kw] become flax kernels [kh, kw, I, O]; linear
weights [O, I] become [I, O]; GroupNorm ``weight`` becomes ``scale``. Legacy attention
names (``query``/``key``/``value``/``proj_attn``) are accepted.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ddx import schedules
from ddx.models.build import abstract, param_shapes, with_params
from ddx.models.configs import UNetConfig
from ddx.models.io import torch_state as torch_import
from ddx.models.io.latent import unet_cond_from_diffusers
from ddx.models.unet import UNet

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # or its sharded form, see torch_state.read_safetensors
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# diffusers UNet2DModel defaults (used for keys absent from config.json).
_DIFFUSERS_DEFAULTS = {
  "sample_size": None,
  "in_channels": 3,
  "out_channels": 3,
  "center_input_sample": False,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "freq_shift": 0,
  "flip_sin_to_cos": True,
  "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
  "mid_block_type": "UNetMidBlock2D",
  "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  "block_out_channels": (224, 448, 672, 896),
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "downsample_padding": 1,
  "downsample_type": "conv",
  "upsample_type": "conv",
  "dropout": 0.0,
  "act_fn": "silu",
  "attention_head_dim": 8,
  "norm_num_groups": 32,
  "attn_norm_num_groups": None,
  "norm_eps": 1e-5,
  "resnet_time_scale_shift": "default",
  "add_attention": True,
  "class_embed_type": None,
  "num_class_embeds": None,
  "num_train_timesteps": None,
}

# Keys that must have exactly these values (anything else is not the DDPM architecture).
_REQUIRED_VALUES = {
  "center_input_sample": (False,),
  "time_embedding_type": ("positional",),
  "mid_block_type": ("UNetMidBlock2D",),
  "mid_block_scale_factor": (1, 1.0),
  "downsample_type": ("conv",),
  "upsample_type": ("conv",),
  "act_fn": ("silu", "swish"),
  "resnet_time_scale_shift": ("default",),
  "add_attention": (True,),
  "class_embed_type": (None,),
  "num_class_embeds": (None,),
}


def _unsupported(key: str, value: Any, why: str = "") -> ValueError:
  return ValueError(f"{key}: unsupported diffusers UNet2DModel config value {value!r}" + (f" ({why})" if why else ""))


def resolve_unet_dir(path: str | os.PathLike) -> str:
  """The folder holding the UNet ``config.json``: ``path`` itself or ``path/unet``."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, CONFIG_NAME)):
    return path
  if os.path.isfile(os.path.join(path, "unet", CONFIG_NAME)):
    return os.path.join(path, "unet")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"diffusers model folder not found: {path}")
  raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (nor in {os.path.join(path, 'unet')})")


def load_diffusers_config(path: str | os.PathLike) -> dict:
  """Read the UNet2DModel ``config.json`` from a unet folder (or a pipeline folder)."""
  fname = os.path.join(resolve_unet_dir(path), CONFIG_NAME)
  try:
    with open(fname) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{fname}: not valid JSON ({e})") from None


def diffusers_to_unet_config(config: Mapping[str, Any]) -> UNetConfig:
  """The `ddx.models.UNetConfig` of a diffusers UNet2DModel config.

  Raises:
    ValueError: naming the unsupported config key and value.
  """
  cls = config.get("_class_name", "UNet2DModel")
  if cls != "UNet2DModel":
    raise _unsupported("_class_name", cls, "only UNet2DModel is supported")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
  if unknown:
    raise _unsupported(unknown[0], config[unknown[0]], "unknown config key")
  c = dict(_DIFFUSERS_DEFAULTS)
  c.update({k: v for k, v in config.items() if not k.startswith("_")})

  for key, allowed in _REQUIRED_VALUES.items():
    if c[key] not in allowed or isinstance(c[key], bool) != isinstance(allowed[0], bool):
      raise _unsupported(key, c[key], f"supported: {list(allowed)}")

  boc = list(c["block_out_channels"])
  down, up = list(c["down_block_types"]), list(c["up_block_types"])
  nlev = len(boc)
  if not boc or any(not isinstance(b, int) or b < 1 for b in boc):
    raise _unsupported("block_out_channels", boc)
  if len(down) != nlev:
    raise _unsupported("down_block_types", down, "length differs from block_out_channels")
  if len(up) != nlev:
    raise _unsupported("up_block_types", up, "length differs from block_out_channels")
  for b in down:
    if b not in ("DownBlock2D", "AttnDownBlock2D"):
      raise _unsupported("down_block_types", b, "supported: DownBlock2D, AttnDownBlock2D")
  for b in up:
    if b not in ("UpBlock2D", "AttnUpBlock2D"):
      raise _unsupported("up_block_types", b, "supported: UpBlock2D, AttnUpBlock2D")
  base = boc[0]
  if any(b % base for b in boc):
    raise _unsupported("block_out_channels", boc, "each must be a multiple of the first")
  if c["time_embedding_dim"] not in (None, 4 * base):
    raise _unsupported("time_embedding_dim", c["time_embedding_dim"], f"only 4*{base}")
  if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
    raise _unsupported("attn_norm_num_groups", c["attn_norm_num_groups"], "must equal norm_num_groups")
  if c["norm_num_groups"] is None:
    raise _unsupported("norm_num_groups", None)

  attn_down = [lev for lev in range(nlev) if down[lev] == "AttnDownBlock2D"]
  attn_up = sorted(nlev - 1 - i for i in range(nlev) if up[i] == "AttnUpBlock2D")
  if attn_down != attn_up:
    raise _unsupported("up_block_types", up, "attention levels must mirror down_block_types")

  size = c["sample_size"]
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise _unsupported("sample_size", size, "only square images")
    size = size[0]
  if not isinstance(size, int) or size < 1:
    raise _unsupported("sample_size", size)

  try:
    return UNetConfig(
      image_size=size,
      in_channels=c["in_channels"],
      out_channels=c["out_channels"],
      base_channels=base,
      channel_mult=[b // base for b in boc],
      num_res_blocks=c["layers_per_block"],
      attention_resolutions=[size // 2**lev for lev in attn_down],
      num_heads=1,
      head_dim=c["attention_head_dim"],
      dropout=float(c["dropout"]),
      norm_num_groups=c["norm_num_groups"],
      norm_eps=float(c["norm_eps"]),
      flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
      freq_shift=float(c["freq_shift"]),
      downsample_padding=c["downsample_padding"],
    )
  except ValueError as e:  # re-word in terms of the diffusers config
    raise ValueError(f"diffusers config gives an invalid ddx UNet: {e}") from None


def diffusers_scheduler_to_diffusion(sched: Mapping[str, Any] | None) -> dict:
  """The ddx ``"diffusion"`` config section for a diffusers DDPMScheduler config.

  ``None`` (no scheduler_config.json) gives the original DDPM setting: linear betas
  1e-4..0.02, T = 1000, eps prediction, fixed_large variance. Keys missing from a given
  scheduler config take diffusers' DDPMScheduler defaults.
  """
  if sched is None:
    return {
      "num_timesteps": 1000,
      "beta_schedule": "linear",
      "beta_start": 1e-4,
      "beta_end": 0.02,
      "prediction": "eps",
      "variance": "fixed_large",
      "rescale_zero_snr": False,
      "clip_sample": True,
    }
  s = dict(sched)
  if s.get("trained_betas") is not None:
    raise _unsupported("trained_betas", "<array>", "explicit betas are not supported")
  try:
    schedule = schedules.canonical_name(s.get("beta_schedule", "linear"))
  except ValueError:
    raise _unsupported("beta_schedule", s.get("beta_schedule")) from None
  var_in = s.get("variance_type", "fixed_small")
  variance = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
  }.get(var_in)
  if variance is None:
    raise _unsupported("variance_type", var_in)
  pred_in = s.get("prediction_type", "epsilon")
  prediction = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}.get(pred_in)
  if prediction is None:
    raise _unsupported("prediction_type", pred_in)
  cosine = schedule == "cosine"
  return {
    "num_timesteps": int(s.get("num_train_timesteps", 1000)),
    "beta_schedule": schedule,
    "beta_start": None if cosine else float(s.get("beta_start", 1e-4)),
    "beta_end": None if cosine else float(s.get("beta_end", 0.02)),
    "prediction": prediction,
    "variance": variance,
    "rescale_zero_snr": bool(s.get("rescale_betas_zero_snr", False)),
    "clip_sample": bool(s.get("clip_sample", True)),
  }


def load_scheduler_config(path: str | os.PathLike) -> dict | None:
  """scheduler_config.json next to the unet folder (``../scheduler/``) or inside it, or None."""
  unet_dir = resolve_unet_dir(path)
  parent = os.path.dirname(os.path.abspath(unet_dir))
  for cand in (
    os.path.join(parent, "scheduler", SCHEDULER_CONFIG_NAME),
    os.path.join(unet_dir, SCHEDULER_CONFIG_NAME),
    os.path.join(parent, SCHEDULER_CONFIG_NAME),
  ):
    if os.path.isfile(cand):
      with open(cand) as f:
        return json.load(f)
  return None


def _diffusers_name(path: tuple) -> str:
  """ddx pure-dict path -> diffusers UNet2DModel tensor name."""
  *mods, leaf = path
  parts = []
  for m in mods:
    if m == "resample":
      parts.append("downsamplers.0" if mods[0] == "down_blocks" else "upsamplers.0")
    elif m == "to_out":
      parts.append("to_out.0")
    else:
      parts.append(str(m))
  return ".".join(parts) + "." + torch_import.LEAF[leaf]


def convert_state_dict(state: Mapping[str, np.ndarray], abstract_params: dict) -> dict:
  """Map a diffusers UNet2DModel state dict onto the ddx pure param dict structure.

  Args:
    state: diffusers name -> numpy array.
    abstract_params: the ddx pure dict (leaves with ``.shape``) to fill.

  Returns:
    A pure dict with the same structure holding float32 numpy arrays.

  Raises:
    ValueError: one line naming a missing, unexpected, wrongly-shaped or non-finite tensor.
  """
  return torch_import.convert_state(
    state, abstract_params, what="weights", name_of=_diffusers_name, legacy=torch_import.LEGACY_ATTN
  )


def from_diffusers(path: str | os.PathLike, **overrides) -> UNet:
  """Load a diffusers UNet2DModel folder as a `ddx.models.UNet` computing the same function.

  A UNet2DConditionModel folder (``_class_name`` in config.json) is loaded as a
  `ddx.models.UNetCond` instead (`ddx.models.io.latent.unet_cond_from_diffusers`).

  Args:
    path: the unet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a
      pipeline folder with a ``unet/`` subfolder.
    **overrides: `UNetConfig` fields to change after conversion (e.g. ``dtype="bfloat16"``,
      ``remat=True``, ``dropout=0.1``); architecture-changing overrides fail on load.

  Returns:
    The UNet; call it with NHWC inputs: ``model(x_nhwc, t)``.
  """
  config = load_diffusers_config(path)
  if config.get("_class_name") == "UNet2DConditionModel":  # the latent-diffusion U-Net
    return unet_cond_from_diffusers(resolve_unet_dir(path), **overrides)
  module = abstract(diffusers_to_unet_config(config).replace(**overrides))
  state = torch_import.read_safetensors(resolve_unet_dir(path), (WEIGHTS_NAME,), "weights")
  return with_params(module, convert_state_dict(state, param_shapes(module)))
