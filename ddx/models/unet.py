"""The DDPM-family U-Net (Ho et al. 2020; diffusers ``UNet2DModel``) in flax.nnx, NHWC.

Architecture (``L = len(channel_mult)`` levels, ``ch_l = base_channels * channel_mult[l]``)::

    conv_in (3x3, in_channels -> base_channels)
    down_blocks[l], l = 0..L-1:  num_res_blocks x (ResnetBlock [+ AttentionBlock]),
                                 then Downsample unless l == L-1
    mid_block:                   ResnetBlock, AttentionBlock, ResnetBlock
    up_blocks[i], i = 0..L-1 (level l = L-1-i):
                                 (num_res_blocks + 1) x (concat skip, ResnetBlock
                                 [+ AttentionBlock]), then Upsample unless l == 0
    conv_norm_out (GroupNorm), SiLU, conv_out (3x3 -> out_channels, x2 with learn_sigma)

Attention is used at level ``l`` iff its resolution ``image_size // 2**l`` is listed in
``attention_resolutions``; the mid block always has attention. The time embedding is
``Linear(SiLU(Linear(sinusoidal(t))))`` of width ``4 * base_channels``; the optional class
embedding (``num_classes + 1`` rows, the last being the null label used by classifier-free
guidance) is added to it.

The parameter names mirror diffusers so that :func:`ddx.models.from_diffusers` is a rename.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx.models import dtypes
from ddx.models.layers import (
  CONV_IMPLS,
  AttentionBlock,
  Conv,
  Downsample,
  GroupNorm,
  ResnetBlock,
  TimestepEmbedding,
  Upsample,
  batch_timesteps,
)

Array = jax.Array


class _Level(nnx.Module):
  """One resolution level of the encoder or decoder (``resnets``, ``attentions``, resampler)."""

  def __init__(self, resnets, attentions, resample):
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List(attentions)
    self.resample = resample


class _MidBlock(nnx.Module):
  def __init__(self, resnets, attentions):
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List(attentions)


class UNet(nnx.Module):
  """DDPM U-Net. See the module docstring for the architecture.

  Args:
    image_size: height = width of the inputs the model is built for (used to place
      attention and to validate ``attention_resolutions``; the model is convolutional and
      runs on any size divisible by ``2 ** (len(channel_mult) - 1)``).
    in_channels: input channels C_in.
    out_channels: output channels (default ``in_channels``); doubled when ``learn_sigma``.
    base_channels: channels of level 0 (DDPM: 128).
    channel_mult: per-level channel multipliers (DDPM CIFAR-10: (1, 2, 2, 2)).
    num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
    attention_resolutions: spatial resolutions at which attention is used (e.g. (16,)).
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
    num_classes: None (or 0) for an unconditional model; otherwise labels are
      ``0..num_classes-1`` and ``num_classes`` is the null label.
    learn_sigma: double the output channels (eps and the variance interpolation v).
    dtype: compute dtype (None / "float32" or "bfloat16"); outputs are always float32.
    param_dtype: parameter storage dtype (default float32).
    remat: rematerialise each residual / attention block in the backward pass.
    conv_impl: how convolutions run: "auto" (default: chosen per backend when traced, see
      `ddx.models.layers.resolve_conv_impl`), "lax" (XLA's convolution op everywhere) or
      "dots" (matrix products with float32 accumulation). Parameters are the same.
    rngs: ``nnx.Rngs`` used for initialisation only.

  Raises:
    ValueError: a one-line message naming the offending argument for an invalid config.
  """

  def __init__(
    self,
    *,
    image_size: int,
    in_channels: int = 3,
    out_channels: int | None = None,
    base_channels: int = 128,
    channel_mult: Sequence[int] = (1, 2, 2, 2),
    num_res_blocks: int = 2,
    attention_resolutions: Sequence[int] = (16,),
    num_heads: int = 1,
    head_dim: int | None = None,
    dropout: float = 0.0,
    norm_num_groups: int = 32,
    norm_eps: float = 1e-6,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    resample_with_conv: bool = True,
    downsample_padding: int = 1,
    num_classes: int | None = None,
    learn_sigma: bool = False,
    dtype: Any = None,
    param_dtype: Any = "float32",
    remat: bool = False,
    conv_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    kwargs = validate_kwargs(
      image_size=image_size,
      in_channels=in_channels,
      out_channels=out_channels,
      base_channels=base_channels,
      channel_mult=channel_mult,
      num_res_blocks=num_res_blocks,
      attention_resolutions=attention_resolutions,
      num_heads=num_heads,
      head_dim=head_dim,
      dropout=dropout,
      norm_num_groups=norm_num_groups,
      norm_eps=norm_eps,
      flip_sin_to_cos=flip_sin_to_cos,
      freq_shift=freq_shift,
      resample_with_conv=resample_with_conv,
      downsample_padding=downsample_padding,
      num_classes=num_classes,
      learn_sigma=learn_sigma,
      dtype=dtype,
      param_dtype=param_dtype,
      remat=remat,
      conv_impl=conv_impl,
    )
    self._kwargs_json = json.dumps(kwargs, sort_keys=True)  # static, hashable
    k = kwargs
    cdtype, pdtype = dtypes.resolve(k)
    kw = dict(dtype=cdtype, param_dtype=pdtype)
    ckw = dict(kw, conv_impl=k["conv_impl"])
    gn = dict(groups=k["norm_num_groups"], eps=k["norm_eps"])
    ch = k["base_channels"]
    mult = k["channel_mult"]
    nlev = len(mult)
    temb = 4 * ch

    self.image_size = k["image_size"]
    self.in_channels = k["in_channels"]
    self.out_channels = k["out_channels"]
    self.num_classes = k["num_classes"]
    self.learn_sigma = k["learn_sigma"]
    self.remat = k["remat"]
    self.dropout_rate = k["dropout"]
    self.dtype = cdtype
    self.num_levels = nlev

    def heads(c):
      return c // k["head_dim"] if k["head_dim"] else k["num_heads"]

    def res(cin, cout):
      return ResnetBlock(cin, cout, temb, dropout=k["dropout"], rngs=rngs, **gn, **ckw)

    def attn(c):
      return AttentionBlock(c, heads(c), rngs=rngs, **gn, **kw)

    self.conv_in = Conv(k["in_channels"], ch, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, impl=k["conv_impl"], **kw)
    # The time-embedding MLP always computes in float32 (negligible cost; keeps t precise).
    self.time_embedding = TimestepEmbedding(
      ch,
      temb,
      flip_sin_to_cos=k["flip_sin_to_cos"],
      freq_shift=k["freq_shift"],
      rngs=rngs,
      dtype=None,
      param_dtype=pdtype,
    )
    if self.num_classes:
      self.class_embedding = nnx.Embed(self.num_classes + 1, temb, rngs=rngs, **kw)
    else:
      self.class_embedding = None

    attn_res = set(k["attention_resolutions"])
    skip_ch = [ch]
    cur = ch
    down = []
    for lev in range(nlev):
      cout = ch * mult[lev]
      use_attn = (self.image_size // 2**lev) in attn_res
      resnets, attns = [], []
      for _ in range(k["num_res_blocks"]):
        resnets.append(res(cur, cout))
        cur = cout
        if use_attn:
          attns.append(attn(cur))
        skip_ch.append(cur)
      resample = None
      if lev != nlev - 1:
        resample = Downsample(cur, with_conv=k["resample_with_conv"], padding=k["downsample_padding"], rngs=rngs, **ckw)
        skip_ch.append(cur)
      down.append(_Level(resnets, attns, resample))
    self.down_blocks = nnx.List(down)

    self.mid_block = _MidBlock([res(cur, cur), res(cur, cur)], [attn(cur)])

    up = []
    for lev in reversed(range(nlev)):
      cout = ch * mult[lev]
      use_attn = (self.image_size // 2**lev) in attn_res
      resnets, attns = [], []
      for _ in range(k["num_res_blocks"] + 1):
        resnets.append(res(cur + skip_ch.pop(), cout))
        cur = cout
        if use_attn:
          attns.append(attn(cur))
      resample = None
      if lev != 0:
        resample = Upsample(cur, with_conv=k["resample_with_conv"], rngs=rngs, **ckw)
      up.append(_Level(resnets, attns, resample))
    self.up_blocks = nnx.List(up)
    assert not skip_ch

    self.conv_norm_out = GroupNorm(cur, k["norm_num_groups"], epsilon=k["norm_eps"], **kw)
    nout = k["out_channels"] * (2 if k["learn_sigma"] else 1)
    self.conv_out = Conv(cur, nout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, impl=k["conv_impl"], **kw)

  # ------------------------------------------------------------------ helpers

  @property
  def kwargs(self) -> dict:
    """The constructor kwargs (without ``rngs``) as a JSON-serialisable dict."""
    return json.loads(self._kwargs_json)

  def check_labels(self, y) -> None:
    """Host-side validation of concrete labels: int [B] with values in [0, num_classes].

    Raises ValueError for labels on an unconditional model, a non-integer dtype, a wrong
    rank or out-of-range values. Called by ``__call__`` whenever ``y`` is concrete (not
    a tracer); call it yourself before jitting a function that takes labels as input.
    """
    if not self.num_classes:
      raise ValueError("y: class labels given but the model has num_classes=None")
    arr = np.asarray(y)
    if arr.ndim != 1:
      raise ValueError(f"y: labels must have shape [B], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"y: labels must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > self.num_classes):
      raise ValueError(
        f"y: labels must be in [0, {self.num_classes}] ({self.num_classes} = null label), "
        f"got min {arr.min()} max {arr.max()}"
      )

  def _block(self, block, *args):
    if self.remat:
      return nnx.remat(lambda m, *a: m(*a))(block, *args)
    return block(*args)

  # ------------------------------------------------------------------ forward

  def __call__(self, x: Array, t: Array, y: Array | None = None, *, dropout_key: Array | None = None) -> Array:
    """Apply the U-Net.

    Args:
      x: float [B, H, W, C_in] (NHWC); H, W divisible by ``2 ** (levels - 1)``.
      t: int or float [B] (or a scalar, broadcast), the timestep as the model sees it
        (e.g. 0..999 for T = 1000).
      y: int32 [B] class labels in [0, num_classes] (num_classes = null label), or None
        (= the null label on a class-conditional model). Must be None for an
        unconditional model.
      dropout_key: PRNG key for dropout, or None for a deterministic forward pass. No
        other randomness is used.

    Returns:
      float32 [B, H, W, C_out] (C_out = 2 * out_channels with ``learn_sigma``).
    """
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x: expected [B, H, W, {self.in_channels}], got shape {x.shape}")
    div = 2 ** (self.num_levels - 1)
    if x.shape[1] % div or x.shape[2] % div:
      raise ValueError(f"x: spatial size {x.shape[1:3]} not divisible by {div}")
    bsz = x.shape[0]
    t = batch_timesteps(t, bsz)

    if self.class_embedding is not None:
      if y is None:
        y = jnp.full((bsz,), self.num_classes, jnp.int32)
      else:
        if isinstance(y, jax.core.Tracer):  # values unknown: check what is static
          if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"y: labels must be integers, got dtype {y.dtype}")
        else:
          self.check_labels(y)
        y = jnp.asarray(y)
        if y.shape != (bsz,):
          raise ValueError(f"y: expected shape [{bsz}], got {y.shape}")
    elif y is not None:
      raise ValueError("y: class labels given but the model has num_classes=None")

    emb = self.time_embedding(t)
    if self.class_embedding is not None:
      emb = emb + self.class_embedding(y.astype(jnp.int32))

    counter = [0]

    def next_key():
      counter[0] += 1
      if dropout_key is None or self.dropout_rate == 0.0:
        return None
      return jax.random.fold_in(dropout_key, counter[0])

    h = self.conv_in(x.astype(self.dtype) if self.dtype is not None else x)
    hs = [h]
    for level in self.down_blocks:
      for i, resnet in enumerate(level.resnets):
        h = self._block(resnet, h, emb, next_key())
        if len(level.attentions):
          h = self._block(level.attentions[i], h)
        hs.append(h)
      if level.resample is not None:
        h = level.resample(h)
        hs.append(h)

    mid = self.mid_block
    h = self._block(mid.resnets[0], h, emb, next_key())
    h = self._block(mid.attentions[0], h)
    h = self._block(mid.resnets[1], h, emb, next_key())

    for level in self.up_blocks:
      for i, resnet in enumerate(level.resnets):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = self._block(resnet, h, emb, next_key())
        if len(level.attentions):
          h = self._block(level.attentions[i], h)
      if level.resample is not None:
        h = level.resample(h)

    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h.astype(jnp.float32)


def validate_kwargs(**k) -> dict:
  """Check UNet constructor kwargs; return them normalised (JSON types, defaults filled).

  Raises a one-line ValueError naming the argument on the first problem found.
  """

  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  def pos_int(name):
    v = k[name]
    if not is_int(v) or v < 1:
      raise ValueError(f"{name}: must be a positive int, got {v!r}")
    return int(v)

  out = {}
  for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads", "norm_num_groups"):
    out[name] = pos_int(name)
  out["out_channels"] = out["in_channels"] if k["out_channels"] is None else pos_int("out_channels")
  out["head_dim"] = None if k["head_dim"] is None else pos_int("head_dim")

  mult = k["channel_mult"]
  if (
    isinstance(mult, (str, bytes))
    or not isinstance(mult, Sequence)
    or not mult
    or not all(is_int(m) and m >= 1 for m in mult)
  ):
    raise ValueError(f"channel_mult: must be a non-empty sequence of positive ints, got {mult!r}")
  out["channel_mult"] = [int(m) for m in mult]
  nlev = len(mult)

  div = 2 ** (nlev - 1)
  if out["image_size"] % div:
    raise ValueError(f"image_size: {out['image_size']} is not divisible by 2**(levels-1) = {div} for {nlev} levels")
  resolutions = [out["image_size"] // 2**i for i in range(nlev)]

  ares = k["attention_resolutions"]
  if ares is None:
    ares = ()
  if isinstance(ares, (str, bytes)) or not isinstance(ares, Sequence) or not all(is_int(r) for r in ares):
    raise ValueError(f"attention_resolutions: must be a sequence of ints, got {ares!r}")
  for r in ares:
    if r not in resolutions:
      raise ValueError(f"attention_resolutions: {r} is never reached (resolutions: {resolutions})")
  out["attention_resolutions"] = sorted({int(r) for r in ares}, reverse=True)

  channels = sorted({out["base_channels"] * m for m in out["channel_mult"]})
  for c in channels:
    if c % out["norm_num_groups"]:
      raise ValueError(f"norm_num_groups: {out['norm_num_groups']} does not divide {c} channels")
  attn_channels = {out["base_channels"] * out["channel_mult"][-1]}  # mid block
  for i, r in enumerate(resolutions):
    if r in out["attention_resolutions"]:
      attn_channels.add(out["base_channels"] * out["channel_mult"][i])
  for c in sorted(attn_channels):
    if out["head_dim"] is not None and c % out["head_dim"]:
      raise ValueError(f"head_dim: {out['head_dim']} does not divide {c} attention channels")
    if out["head_dim"] is None and c % out["num_heads"]:
      raise ValueError(f"num_heads: {out['num_heads']} does not divide {c} attention channels")

  drop = k["dropout"]
  if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
    raise ValueError(f"dropout: must be a float in [0, 1), got {drop!r}")
  out["dropout"] = float(drop)
  eps = k["norm_eps"]
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f"norm_eps: must be a positive float, got {eps!r}")
  out["norm_eps"] = float(eps)

  for name in ("flip_sin_to_cos", "resample_with_conv", "learn_sigma", "remat"):
    if not isinstance(k[name], (bool, np.bool_)):
      raise ValueError(f"{name}: must be a bool, got {k[name]!r}")
    out[name] = bool(k[name])
  fs = k["freq_shift"]
  if isinstance(fs, bool) or not isinstance(fs, (int, float)):
    raise ValueError(f"freq_shift: must be a number, got {fs!r}")
  out["freq_shift"] = float(fs)
  if out["base_channels"] // 2 - out["freq_shift"] == 0:
    raise ValueError(f"freq_shift: {fs} makes the time embedding divide by zero")
  if k["downsample_padding"] not in (0, 1) or isinstance(k["downsample_padding"], bool):
    raise ValueError(f"downsample_padding: must be 0 or 1, got {k['downsample_padding']!r}")
  out["downsample_padding"] = int(k["downsample_padding"])

  nc = k["num_classes"]
  if nc is not None and (not is_int(nc) or nc < 0):
    raise ValueError(f"num_classes: must be None or an int >= 0, got {nc!r}")
  out["num_classes"] = int(nc) if nc else None

  if k["conv_impl"] not in CONV_IMPLS:
    raise ValueError(f"conv_impl: must be one of {list(CONV_IMPLS)}, got {k['conv_impl']!r}")
  out["conv_impl"] = k["conv_impl"]

  out.update(dtypes.checked(k["dtype"], k["param_dtype"]))
  return out


def unet_kwargs(**kwargs) -> dict:
  """Complete (defaults filled in), validated, JSON-serialisable UNet constructor kwargs.

  Raises ValueError for an unknown kwarg name or an invalid value.
  """

  kwargs.pop("rngs", None)
  params = inspect.signature(UNet.__init__).parameters
  unknown = sorted(set(kwargs) - set(UNET_KWARGS))
  if unknown:
    raise ValueError(f"{unknown[0]}: not a UNet constructor argument")
  full = {}
  for name in UNET_KWARGS:
    if name in kwargs:
      full[name] = kwargs[name]
    elif params[name].default is inspect.Parameter.empty:
      raise ValueError(f"{name}: required UNet argument is missing")
    else:
      full[name] = params[name].default
  return validate_kwargs(**full)


def unet_param_count(**kwargs) -> int:
  """Number of parameters of ``UNet(**kwargs)``, computed with ``nnx.eval_shape`` (no allocation)."""
  kwargs.pop("rngs", None)
  abstract = nnx.eval_shape(lambda: UNet(**kwargs, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def abstract_unet(**kwargs) -> UNet:
  """A UNet whose parameters are ``jax.ShapeDtypeStruct`` (no allocation), for restoring."""
  kwargs.pop("rngs", None)
  return nnx.eval_shape(lambda: UNet(**kwargs, rngs=nnx.Rngs(0)))


# Keyword names of the constructor, for config validation by other modules.
UNET_KWARGS = (
  "image_size",
  "in_channels",
  "out_channels",
  "base_channels",
  "channel_mult",
  "num_res_blocks",
  "attention_resolutions",
  "num_heads",
  "head_dim",
  "dropout",
  "norm_num_groups",
  "norm_eps",
  "flip_sin_to_cos",
  "freq_shift",
  "resample_with_conv",
  "downsample_padding",
  "num_classes",
  "learn_sigma",
  "dtype",
  "param_dtype",
  "remat",
  "conv_impl",
)
