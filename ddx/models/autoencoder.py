"""The KL autoencoder of latent diffusion (Rombach et al. 2022; diffusers ``AutoencoderKL``), NNX, NHWC.

Architecture (``L = len(block_out_channels)``, ``c_l = block_out_channels[l]``)::

    encoder: conv_in (3x3 -> c_0)
             down_blocks[l]: layers_per_block x ResnetBlock, then a stride-2 conv
                             (padded bottom/right only) unless l == L-1
             mid_block: ResnetBlock, [self-attention (one head)], ResnetBlock
             GroupNorm, SiLU, conv_out (3x3 -> 2 * latent_channels)
    quant_conv (1x1, optional) -> (mean, logvar) = split(channels); logvar clamped to [-30, 20]
    post_quant_conv (1x1, optional)
    decoder: conv_in (3x3 -> c_{L-1}), mid_block,
             up_blocks[i] (level L-1-i): (layers_per_block + 1) x ResnetBlock, then nearest x2
                                         and a 3x3 conv unless i == L-1
             GroupNorm, SiLU, conv_out (3x3 -> out_channels)

Every GroupNorm uses eps 1e-6; residual blocks have no time conditioning.

Latent boundary: a diffusion model sees *scaled* latents ``z_s = (z - shift_factor) *
scaling_factor`` (``shift_factor`` 0 when the config has none), so `encode_latents` returns
scaled latents and `decode` takes them; `encode` returns the unscaled posterior.

The constructor's arguments are the fields of `ddx.models.configs.AutoencoderConfig`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ddx.models import dtypes
from ddx.models.configs import AutoencoderConfig
from ddx.models.layers import AttentionBlock, Downsample, GroupNorm, ResnetBlock, Upsample

Array = jax.Array

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the reference's clamp


class DiagonalGaussian(NamedTuple):
  """The encoder's posterior ``N(mean, exp(logvar))`` in unscaled latent space, NHWC."""

  mean: Array  # float32 [B, h, w, latent_channels]
  logvar: Array  # float32, clamped to [LOGVAR_MIN, LOGVAR_MAX]

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: Array) -> Array:
    """``mean + std * normal(key)``."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """KL(q || N(0, I)) summed over (h, w, c): float32 [B]."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class _Block(nnx.Module):
  """One encoder / decoder level (``resnets`` + optional ``downsamplers`` / ``upsamplers``)."""

  def __init__(self, resnets, downsamplers=None, upsamplers=None):
    self.resnets = nnx.List(resnets)
    self.downsamplers = nnx.List(downsamplers) if downsamplers else None
    self.upsamplers = nnx.List(upsamplers) if upsamplers else None


class _Mid(nnx.Module):
  def __init__(self, resnets, attentions):
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List(attentions)

  def __call__(self, h):
    h = self.resnets[0](h, None)
    if len(self.attentions):
      h = self.attentions[0](h)
    return self.resnets[1](h, None)


class Encoder(nnx.Module):
  """x [B, H, W, in_channels] -> [B, H / 2^(L-1), W / 2^(L-1), 2 * latent_channels]."""

  def __init__(
    self,
    in_channels,
    latent_channels,
    block_out_channels,
    layers_per_block,
    groups,
    mid_attention,
    *,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    boc = block_out_channels
    res = lambda ci, co: ResnetBlock(ci, co, None, groups=groups, eps=1e-6, dropout=0.0, rngs=rngs, **kw)
    self.conv_in = nnx.Conv(in_channels, boc[0], (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, **kw)
    blocks, cur = [], boc[0]
    for lev, c in enumerate(boc):
      resnets = []
      for _ in range(layers_per_block):
        resnets.append(res(cur, c))
        cur = c
      down = None
      if lev != len(boc) - 1:
        down = [Downsample(cur, with_conv=True, padding=0, rngs=rngs, **kw)]
      blocks.append(_Block(resnets, downsamplers=down))
    self.down_blocks = nnx.List(blocks)
    attn = [AttentionBlock(cur, 1, groups=groups, eps=1e-6, rngs=rngs, **kw)] if mid_attention else []
    self.mid_block = _Mid([res(cur, cur), res(cur, cur)], attn)
    self.conv_norm_out = GroupNorm(cur, groups, epsilon=1e-6, **kw)
    self.conv_out = nnx.Conv(cur, 2 * latent_channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, **kw)

  def __call__(self, x):
    h = self.conv_in(x)
    for block in self.down_blocks:
      for r in block.resnets:
        h = r(h, None)
      if block.downsamplers is not None:
        h = block.downsamplers[0](h)
    h = self.mid_block(h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  """z [B, h, w, latent_channels] -> [B, h * 2^(L-1), w * 2^(L-1), out_channels]."""

  def __init__(
    self,
    latent_channels,
    out_channels,
    block_out_channels,
    layers_per_block,
    groups,
    mid_attention,
    *,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    rev = list(reversed(block_out_channels))
    res = lambda ci, co: ResnetBlock(ci, co, None, groups=groups, eps=1e-6, dropout=0.0, rngs=rngs, **kw)
    cur = rev[0]
    self.conv_in = nnx.Conv(latent_channels, cur, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, **kw)
    attn = [AttentionBlock(cur, 1, groups=groups, eps=1e-6, rngs=rngs, **kw)] if mid_attention else []
    self.mid_block = _Mid([res(cur, cur), res(cur, cur)], attn)
    blocks = []
    for i, c in enumerate(rev):
      resnets = []
      for _ in range(layers_per_block + 1):
        resnets.append(res(cur, c))
        cur = c
      up = [Upsample(cur, with_conv=True, rngs=rngs, **kw)] if i != len(rev) - 1 else None
      blocks.append(_Block(resnets, upsamplers=up))
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(cur, groups, epsilon=1e-6, **kw)
    self.conv_out = nnx.Conv(cur, out_channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, **kw)

  def __call__(self, z):
    h = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      for r in block.resnets:
        h = r(h, None)
      if block.upsamplers is not None:
        h = block.upsamplers[0](h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  """KL-regularised autoencoder; see the module docstring.

  ``AutoencoderKL(config, rngs=...)`` with an `AutoencoderConfig` (its fields are documented
  there), or ``AutoencoderKL(**fields, rngs=...)``; fields given with a config replace its
  values. ``model.config`` is the normalised config (its ``to_json()`` is what an autoencoder
  workdir's config.json stores). ``rngs`` (``nnx.Rngs``) is for initialisation only.
  """

  def __init__(self, config: AutoencoderConfig | None = None, *, rngs: nnx.Rngs, **fields):
    self.config = k = AutoencoderConfig.of(config, **fields)
    cdtype, pdtype = dtypes.resolve(k)
    kw = dict(dtype=cdtype, param_dtype=pdtype)
    self.dtype = cdtype
    self.in_channels = k.in_channels
    self.latent_channels = k.latent_channels
    self.scaling_factor = k.scaling_factor
    self.shift_factor = k.shift_factor
    self.downscale = 2 ** (len(k.block_out_channels) - 1)
    lc = k.latent_channels
    args = (k.block_out_channels, k.layers_per_block, k.norm_num_groups, k.mid_block_add_attention)
    self.encoder = Encoder(k.in_channels, lc, *args, rngs=rngs, **kw)
    self.decoder = Decoder(lc, k.out_channels, *args, rngs=rngs, **kw)
    self.quant_conv = nnx.Conv(2 * lc, 2 * lc, (1, 1), rngs=rngs, **kw) if k.use_quant_conv else None
    self.post_quant_conv = nnx.Conv(lc, lc, (1, 1), rngs=rngs, **kw) if k.use_post_quant_conv else None

  def _cast(self, x):
    return x.astype(self.dtype) if self.dtype is not None else x

  def encode(self, x: Array) -> DiagonalGaussian:
    """x: float [B, H, W, in_channels] (images in [-1, 1]); H, W divisible by the downscale.

    Returns the unscaled posterior (float32 mean / clamped logvar, [B, H/f, W/f, latent]).
    """
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x: expected images [B, H, W, {self.in_channels}], got shape {x.shape}")
    if x.shape[1] % self.downscale or x.shape[2] % self.downscale:
      raise ValueError(f"x: height and width must be divisible by {self.downscale}, got {x.shape[1:3]}")
    h = self.encoder(self._cast(x))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  def scale_latents(self, z: Array) -> Array:
    """Unscaled latents -> what the diffusion model sees: ``(z - shift) * scale``."""
    return (z - (self.shift_factor or 0.0)) * self.scaling_factor

  def unscale_latents(self, z: Array) -> Array:
    """Inverse of `scale_latents`: ``z / scale + shift``."""
    return z / self.scaling_factor + (self.shift_factor or 0.0)

  def encode_latents(self, x: Array, key: Array | None = None) -> Array:
    """Scaled latents of images x: a posterior sample with ``key``, its mean without."""
    post = self.encode(x)
    z = post.mode() if key is None else post.sample(key)
    return self.scale_latents(z)

  def decode(self, z: Array, *, scaled: bool = True) -> Array:
    """Latents [B, h, w, latent_channels] -> images float32 [B, h*f, w*f, out_channels].

    ``scaled=True`` (default): ``z`` are scaled latents, as produced by `encode_latents` and
    sampled by a latent diffusion model; ``scaled=False``: raw posterior-space latents.
    """
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"z: expected latents [B, h, w, {self.latent_channels}], got shape {z.shape}")
    if scaled:
      z = self.unscale_latents(z.astype(jnp.float32))
    z = self._cast(z)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array, key: Array | None = None) -> Array:
    """Reconstruction: decode(encode_latents(x, key))."""
    return self.decode(self.encode_latents(x, key))
