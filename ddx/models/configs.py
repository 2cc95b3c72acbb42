"""The architecture of each network as a frozen dataclass: the one list of its fields and the
one place that checks them.

* `UNetConfig` (`ddx.models.UNet`), `UNetCondConfig` (`ddx.models.UNetCond`),
  `AutoencoderConfig` (`ddx.models.AutoencoderKL`), `CLIPTextConfig`
  (`ddx.models.CLIPTextEncoder`).

Each config validates and normalises its fields in ``__post_init__`` (a one-line
``ValueError("<field>: ...")`` on the first problem; sequences become tuples, dtypes their
canonical names, per-level values one entry per level), so a config that exists is one its
network can be built from. Configs are hashable and hold no arrays: a module keeps its config as
static (graph-definition) data. ``to_json()`` is the JSON form (tuples as lists) that a
checkpoint's ``config.json`` stores as its ``model`` section; ``from_json(d)`` reads it back
(an unknown key is an error naming it, a missing key takes the field's default).

The four live in one module rather than beside their networks because what they check is
largely shared (positive ints, channel lists, per-level values, dtypes, the JSON round trip)
and is written once here; the importers (`ddx.models.io`) and the command line's config schema
(`ddx.cli.defaults`, `ddx.cli.config`) read configs from here without reaching into the
network modules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ddx.models import dtypes
from ddx.models.layers import CONV_IMPLS

# The activations of the CLIP text transformer (see ddx.models.clip_text).
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _pos_int(name: str, v) -> int:
  if not _is_int(v) or v < 1:
    raise ValueError(f"{name}: must be a positive int, got {v!r}")
  return int(v)


def _optional_pos_int(name: str, v) -> int | None:
  return None if v is None else _pos_int(name, v)


def _bool(name: str, v) -> bool:
  if not isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{name}: must be a bool, got {v!r}")
  return bool(v)


def _positive_float(name: str, v) -> float:
  if not _is_number(v) or not v > 0:
    raise ValueError(f"{name}: must be a positive float, got {v!r}")
  return float(v)


def _is_sequence(v) -> bool:
  return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


def _channels(name: str, v) -> tuple[int, ...]:
  """A non-empty sequence of positive ints (channel counts or multipliers)."""
  if not _is_sequence(v) or not v or not all(_is_int(c) and c >= 1 for c in v):
    raise ValueError(f"{name}: must be a non-empty sequence of positive ints, got {v!r}")
  return tuple(int(c) for c in v)


def _groups_divide(groups: int, channels) -> None:
  for c in channels:
    if c % groups:
      raise ValueError(f"norm_num_groups: {groups} does not divide {c} channels")


def _freq_shift(v, channels: int) -> float:
  """The sinusoidal embedding's shift; its frequencies divide by ``channels // 2 - shift``."""
  if not _is_number(v):
    raise ValueError(f"freq_shift: must be a number, got {v!r}")
  if channels // 2 - v == 0:
    raise ValueError(f"freq_shift: {v} makes the time embedding divide by zero")
  return float(v)


def _downsample_padding(v) -> int:
  if isinstance(v, bool) or v not in (0, 1):
    raise ValueError(f"downsample_padding: must be 0 or 1, got {v!r}")
  return int(v)


def _conv_impl(v) -> str:
  if v not in CONV_IMPLS:
    raise ValueError(f"conv_impl: must be one of {list(CONV_IMPLS)}, got {v!r}")
  return v


def _jsonable(v):
  return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


class _Config:
  """What the four configs share: the JSON round trip, checked replacement, and the
  normalised values ``__post_init__`` computes written back into the frozen fields."""

  def _set(self, values: Mapping[str, Any]) -> None:
    for name, v in values.items():
      object.__setattr__(self, name, v)

  def to_json(self) -> dict:
    """The fields as a JSON-serialisable dict (tuples as lists)."""
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]):
    """The config of a field -> value mapping (e.g. ``to_json()``'s, or a constructor's keyword
    arguments); a missing key takes its default. ValueError naming an unknown or missing key."""
    if not isinstance(d, Mapping):
      raise ValueError(f"config: {cls.__name__} needs a mapping of field values, got {type(d).__name__}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(k for k in d if k not in names)
    if unknown:
      raise ValueError(f"{unknown[0]}: not a {cls.__name__} field")
    for f in fields:
      if f.name not in d and f.default is dataclasses.MISSING:
        raise ValueError(f"{f.name}: required {cls.__name__} field is missing")
    return cls(**d)

  def replace(self, **changes):
    """A copy with ``changes`` applied, normalised and checked again."""
    return type(self).from_json({**self.to_json(), **changes}) if changes else self

  @classmethod
  def of(cls, config=None, /, **fields):
    """What a network's constructor takes: ``config`` with ``fields`` replaced, or (without a
    config) the config of ``fields`` alone, so ``Net(config)`` and ``Net(**fields)`` both work."""
    if config is None:
      return cls.from_json(fields)
    if not isinstance(config, cls):
      raise TypeError(f"config: expected a {cls.__name__}, got {type(config).__name__}")
    return config.replace(**fields)


@dataclasses.dataclass(frozen=True)
class UNetConfig(_Config):
  """The DDPM-family U-Net (`ddx.models.UNet`; see `ddx.models.unet` for the architecture).

  Fields:
    image_size: height = width of the inputs the model is built for (places attention and
      validates ``attention_resolutions``; the model is convolutional and runs on any size
      divisible by ``2 ** (len(channel_mult) - 1)``).
    in_channels: input channels C_in.
    out_channels: output channels (None: ``in_channels``); doubled when ``learn_sigma``.
    base_channels: channels of level 0 (DDPM: 128).
    channel_mult: per-level channel multipliers (DDPM CIFAR-10: (1, 2, 2, 2)).
    num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
    attention_resolutions: spatial resolutions at which attention is used (e.g. (16,));
      normalised to distinct values, largest first.
    num_heads: attention heads (used when ``head_dim`` is None).
    head_dim: channels per attention head; overrides ``num_heads`` (heads = C // head_dim).
    dropout: dropout rate inside the residual blocks (only active with a ``dropout_key``).
    norm_num_groups: GroupNorm groups; must divide every channel count.
    norm_eps: GroupNorm epsilon.
    flip_sin_to_cos: time embedding order ``[cos, sin]`` (True) or ``[sin, cos]`` (False,
      original DDPM).
    freq_shift: time-embedding frequency shift (original DDPM: 1, diffusers default: 0).
    resample_with_conv: stride-2 conv / conv after nearest upsampling (True) or plain
      average pooling / nearest upsampling (False).
    downsample_padding: 1 = pad all sides (diffusers default), 0 = pad bottom/right
      only (TF "SAME", the google/ddpm-* checkpoints).
    num_classes: None (or 0, normalised to None) for an unconditional model; otherwise labels
      are ``0..num_classes-1`` and ``num_classes`` is the null label.
    learn_sigma: double the output channels (eps and the variance interpolation v).
    dtype: compute dtype (None / "float32" or "bfloat16"); outputs are always float32.
    param_dtype: parameter storage dtype.
    remat: rematerialise each residual / attention block in the backward pass.
    conv_impl: how convolutions run: "auto" (chosen per backend when traced, see
      `ddx.models.layers.resolve_conv_impl`), "lax" (XLA's convolution op everywhere) or
      "dots" (matrix products with float32 accumulation). Parameters are the same.
  """

  image_size: int
  in_channels: int = 3
  out_channels: int | None = None
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (16,)
  num_heads: int = 1
  head_dim: int | None = None
  dropout: float = 0.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  resample_with_conv: bool = True
  downsample_padding: int = 1
  num_classes: int | None = None
  learn_sigma: bool = False
  dtype: str | None = None
  param_dtype: str = "float32"
  remat: bool = False
  conv_impl: str = "auto"

  def __post_init__(self):
    out = {}
    for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads", "norm_num_groups"):
      out[name] = _pos_int(name, getattr(self, name))
    out["out_channels"] = (
      out["in_channels"] if self.out_channels is None else _pos_int("out_channels", self.out_channels)
    )
    out["head_dim"] = _optional_pos_int("head_dim", self.head_dim)
    out["channel_mult"] = mult = _channels("channel_mult", self.channel_mult)
    nlev = len(mult)
    div = 2 ** (nlev - 1)
    if out["image_size"] % div:
      raise ValueError(f"image_size: {out['image_size']} is not divisible by 2**(levels-1) = {div} for {nlev} levels")
    resolutions = [out["image_size"] // 2**i for i in range(nlev)]

    ares = () if self.attention_resolutions is None else self.attention_resolutions
    if not _is_sequence(ares) or not all(_is_int(r) for r in ares):
      raise ValueError(f"attention_resolutions: must be a sequence of ints, got {ares!r}")
    for r in ares:
      if r not in resolutions:
        raise ValueError(f"attention_resolutions: {r} is never reached (resolutions: {resolutions})")
    out["attention_resolutions"] = tuple(sorted({int(r) for r in ares}, reverse=True))

    base = out["base_channels"]
    _groups_divide(out["norm_num_groups"], sorted({base * m for m in mult}))
    attn_channels = {base * mult[-1]}  # the mid block
    for i, r in enumerate(resolutions):
      if r in out["attention_resolutions"]:
        attn_channels.add(base * mult[i])
    for c in sorted(attn_channels):
      if out["head_dim"] is not None and c % out["head_dim"]:
        raise ValueError(f"head_dim: {out['head_dim']} does not divide {c} attention channels")
      if out["head_dim"] is None and c % out["num_heads"]:
        raise ValueError(f"num_heads: {out['num_heads']} does not divide {c} attention channels")

    drop = self.dropout
    if not _is_number(drop) or not 0.0 <= drop < 1.0:
      raise ValueError(f"dropout: must be a float in [0, 1), got {drop!r}")
    out["dropout"] = float(drop)
    out["norm_eps"] = _positive_float("norm_eps", self.norm_eps)
    for name in ("flip_sin_to_cos", "resample_with_conv", "learn_sigma", "remat"):
      out[name] = _bool(name, getattr(self, name))
    out["freq_shift"] = _freq_shift(self.freq_shift, base)
    out["downsample_padding"] = _downsample_padding(self.downsample_padding)
    nc = self.num_classes
    if nc is not None and (not _is_int(nc) or nc < 0):
      raise ValueError(f"num_classes: must be None or an int >= 0, got {nc!r}")
    out["num_classes"] = int(nc) if nc else None
    out["conv_impl"] = _conv_impl(self.conv_impl)
    out.update(dtypes.checked(self.dtype, self.param_dtype))
    self._set(out)


@dataclasses.dataclass(frozen=True)
class UNetCondConfig(_Config):
  """The text-conditional U-Net of Stable Diffusion (`ddx.models.UNetCond`; see
  `ddx.models.unet_cond` for the architecture and the meaning of the head counts).

  Fields:
    in_channels, out_channels: latent channels (SD: 4, 4).
    block_out_channels: channels per level (SD: (320, 640, 1280, 1280)).
    down_cross: per level, whether the down block has transformers (CrossAttnDownBlock2D).
    up_cross: per up block (deepest first), whether it has transformers (CrossAttnUpBlock2D).
    layers_per_block: residual blocks per down level (an int or one per level).
    transformer_layers: BasicTransformerBlocks per Transformer2D (an int or one per level).
    num_heads: attention heads (an int or one per level).
    cross_attention_dim: the context width D (SD 1.x: 768, SD 2.x: 1024).
    use_linear_projection: linear (True) or 1x1-conv (False) proj_in / proj_out.
    norm_num_groups, norm_eps: GroupNorm of the residual blocks and the output.
    flip_sin_to_cos, freq_shift: the sinusoidal embedding (SD: True, 0).
    downsample_padding: 1 (pad all sides, SD) or 0 (bottom / right only).
    class_embed_type: None (a table of ``num_class_embeds`` rows, if given) or "timestep"
      (labels through the sinusoidal embedding and their own MLP).
    num_class_embeds: number of classes for ``class_embed_type=None`` (None: no classes).
    dtype, param_dtype, remat, conv_impl: as for `UNetConfig`.

  The per-level fields are normalised to one entry per level.
  """

  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_cross: tuple[bool, ...] = (True, True, True, False)
  up_cross: tuple[bool, ...] = (False, True, True, True)
  layers_per_block: int | tuple[int, ...] = 2
  transformer_layers: int | tuple[int, ...] = 1
  num_heads: int | tuple[int, ...] = 8
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  class_embed_type: str | None = None
  num_class_embeds: int | None = None
  dtype: str | None = None
  param_dtype: str = "float32"
  remat: bool = False
  conv_impl: str = "auto"

  def __post_init__(self):
    out = {
      n: _pos_int(n, getattr(self, n))
      for n in ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups")
    }
    out["block_out_channels"] = boc = _channels("block_out_channels", self.block_out_channels)
    nlev = len(boc)

    def per_level(name, check):
      v = getattr(self, name)
      if _is_sequence(v):
        if len(v) != nlev:
          raise ValueError(f"{name}: needs one entry per level ({nlev}), got {list(v)!r}")
        return tuple(check(name, x) for x in v)
      return (check(name, v),) * nlev

    out["down_cross"] = per_level("down_cross", _bool)
    out["up_cross"] = per_level("up_cross", _bool)
    out["layers_per_block"] = per_level("layers_per_block", _pos_int)
    out["transformer_layers"] = per_level("transformer_layers", _pos_int)
    out["num_heads"] = per_level("num_heads", _pos_int)
    _groups_divide(out["norm_num_groups"], boc)
    for c, h in zip(boc, out["num_heads"]):
      if c % h:
        raise ValueError(f"num_heads: {h} heads do not divide {c} channels")
    for name in ("use_linear_projection", "flip_sin_to_cos", "remat"):
      out[name] = _bool(name, getattr(self, name))
    out["norm_eps"] = _positive_float("norm_eps", self.norm_eps)
    out["freq_shift"] = _freq_shift(self.freq_shift, boc[0])
    out["downsample_padding"] = _downsample_padding(self.downsample_padding)
    if self.class_embed_type not in (None, "timestep"):
      raise ValueError(f"class_embed_type: must be None or 'timestep', got {self.class_embed_type!r}")
    nc = self.num_class_embeds
    if nc is not None and (not _is_int(nc) or nc < 1):
      raise ValueError(f"num_class_embeds: must be None or a positive int, got {nc!r}")
    out["num_class_embeds"] = None if nc is None else int(nc)
    out["conv_impl"] = _conv_impl(self.conv_impl)
    out.update(dtypes.checked(self.dtype, self.param_dtype))
    self._set(out)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(_Config):
  """The KL autoencoder of latent diffusion (`ddx.models.AutoencoderKL`; see
  `ddx.models.autoencoder` for the architecture and the latent boundary).

  Fields:
    in_channels, out_channels: image channels (3 for RGB).
    block_out_channels: channels per level (SD: (128, 256, 512, 512)); the latent is
      ``2 ** (len - 1)`` times smaller than the image in each spatial dimension.
    layers_per_block: residual blocks per encoder level (the decoder has one more).
    latent_channels: latent channels (SD: 4).
    norm_num_groups: GroupNorm groups (must divide every channel count).
    scaling_factor: multiplies (latent - shift_factor) at the latent boundary (SD: 0.18215).
    shift_factor: subtracted before scaling (None = 0; SD3 / Flux configs have one).
    use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent.
    mid_block_add_attention: self-attention in the encoder / decoder mid blocks.
    dtype: compute dtype (None / "float32" / "bfloat16"); outputs are float32.
    param_dtype: parameter storage dtype.
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: str | None = None
  param_dtype: str = "float32"

  def __post_init__(self):
    names = ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
    out = {n: _pos_int(n, getattr(self, n)) for n in names}
    out["block_out_channels"] = _channels("block_out_channels", self.block_out_channels)
    _groups_divide(out["norm_num_groups"], out["block_out_channels"])
    sf = self.scaling_factor
    if not _is_number(sf) or not math.isfinite(sf) or sf == 0:
      raise ValueError(f"scaling_factor: must be a finite non-zero number, got {sf!r}")
    out["scaling_factor"] = float(sf)
    sh = self.shift_factor
    if sh is not None and (not _is_number(sh) or not math.isfinite(sh)):
      raise ValueError(f"shift_factor: must be None or a finite number, got {sh!r}")
    out["shift_factor"] = None if sh is None else float(sh)
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
      out[name] = _bool(name, getattr(self, name))
    out.update(dtypes.checked(self.dtype, self.param_dtype))
    self._set(out)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_Config):
  """The CLIP text transformer (`ddx.models.CLIPTextEncoder`); the fields mirror transformers'
  ``CLIPTextConfig``.

  Fields:
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    max_position_embeddings, layer_norm_eps: the transformer's sizes (SD 1.x:
      49408, 768, 3072, 12, 12, 77, 1e-5).
    hidden_act: "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x).
    eos_token_id: the end-of-text id used for pooling; 2 selects the legacy argmax rule.
    dtype, param_dtype: compute / storage dtypes (outputs are float32).
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  dtype: str | None = None
  param_dtype: str = "float32"

  def __post_init__(self):
    sizes = (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "max_position_embeddings",
    )
    out = {n: _pos_int(n, getattr(self, n)) for n in sizes}
    if out["hidden_size"] % out["num_attention_heads"]:
      raise ValueError(
        f"num_attention_heads: {out['num_attention_heads']} does not divide hidden_size {out['hidden_size']}"
      )
    if self.hidden_act not in CLIP_ACTIVATIONS:
      raise ValueError(f"hidden_act: must be one of {CLIP_ACTIVATIONS}, got {self.hidden_act!r}")
    out["layer_norm_eps"] = _positive_float("layer_norm_eps", self.layer_norm_eps)
    eos = self.eos_token_id
    if not _is_int(eos) or eos < 0:
      raise ValueError(f"eos_token_id: must be an int >= 0, got {eos!r}")
    out["eos_token_id"] = int(eos)
    out.update(dtypes.checked(self.dtype, self.param_dtype))
    self._set(out)
