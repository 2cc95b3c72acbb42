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
The constructor's arguments are the fields of `ddx.models.configs.UNetConfig`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx.models import dtypes
from ddx.models.configs import UNetConfig
from ddx.models.layers import (
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

  ``UNet(config, rngs=...)`` with a `UNetConfig` (its fields are documented there), or
  ``UNet(**fields, rngs=...)``; fields given with a config replace its values. ``model.config``
  is the normalised config (its ``to_json()`` is what a checkpoint's config.json stores).
  ``rngs`` (``nnx.Rngs``) is used for initialisation only.

  Raises:
    ValueError: a one-line message naming the offending field for an invalid config (before
      any parameter is initialised).
  """

  def __init__(self, config: UNetConfig | None = None, *, rngs: nnx.Rngs, **fields):
    self.config = k = UNetConfig.of(config, **fields)
    cdtype, pdtype = dtypes.resolve(k)
    kw = dict(dtype=cdtype, param_dtype=pdtype)
    ckw = dict(kw, conv_impl=k.conv_impl)
    gn = dict(groups=k.norm_num_groups, eps=k.norm_eps)
    ch = k.base_channels
    mult = k.channel_mult
    nlev = len(mult)
    temb = 4 * ch

    self.image_size = k.image_size
    self.in_channels = k.in_channels
    self.out_channels = k.out_channels
    self.num_classes = k.num_classes
    self.learn_sigma = k.learn_sigma
    self.remat = k.remat
    self.dropout_rate = k.dropout
    self.dtype = cdtype
    self.num_levels = nlev

    def heads(c):
      return c // k.head_dim if k.head_dim else k.num_heads

    def res(cin, cout):
      return ResnetBlock(cin, cout, temb, dropout=k.dropout, rngs=rngs, **gn, **ckw)

    def attn(c):
      return AttentionBlock(c, heads(c), rngs=rngs, **gn, **kw)

    self.conv_in = Conv(k.in_channels, ch, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, impl=k.conv_impl, **kw)
    # The time-embedding MLP always computes in float32 (negligible cost; keeps t precise).
    self.time_embedding = TimestepEmbedding(
      ch,
      temb,
      flip_sin_to_cos=k.flip_sin_to_cos,
      freq_shift=k.freq_shift,
      rngs=rngs,
      dtype=None,
      param_dtype=pdtype,
    )
    if self.num_classes:
      self.class_embedding = nnx.Embed(self.num_classes + 1, temb, rngs=rngs, **kw)
    else:
      self.class_embedding = None

    attn_res = set(k.attention_resolutions)
    skip_ch = [ch]
    cur = ch
    down = []
    for lev in range(nlev):
      cout = ch * mult[lev]
      use_attn = (self.image_size // 2**lev) in attn_res
      resnets, attns = [], []
      for _ in range(k.num_res_blocks):
        resnets.append(res(cur, cout))
        cur = cout
        if use_attn:
          attns.append(attn(cur))
        skip_ch.append(cur)
      resample = None
      if lev != nlev - 1:
        resample = Downsample(cur, with_conv=k.resample_with_conv, padding=k.downsample_padding, rngs=rngs, **ckw)
        skip_ch.append(cur)
      down.append(_Level(resnets, attns, resample))
    self.down_blocks = nnx.List(down)

    self.mid_block = _MidBlock([res(cur, cur), res(cur, cur)], [attn(cur)])

    up = []
    for lev in reversed(range(nlev)):
      cout = ch * mult[lev]
      use_attn = (self.image_size // 2**lev) in attn_res
      resnets, attns = [], []
      for _ in range(k.num_res_blocks + 1):
        resnets.append(res(cur + skip_ch.pop(), cout))
        cur = cout
        if use_attn:
          attns.append(attn(cur))
      resample = None
      if lev != 0:
        resample = Upsample(cur, with_conv=k.resample_with_conv, rngs=rngs, **ckw)
      up.append(_Level(resnets, attns, resample))
    self.up_blocks = nnx.List(up)
    assert not skip_ch

    self.conv_norm_out = GroupNorm(cur, k.norm_num_groups, epsilon=k.norm_eps, **kw)
    nout = k.out_channels * (2 if k.learn_sigma else 1)
    self.conv_out = Conv(cur, nout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, impl=k.conv_impl, **kw)

  # ------------------------------------------------------------------ helpers

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
