"""The text-conditional U-Net of Stable Diffusion (diffusers ``UNet2DConditionModel``), NNX, NHWC.

Architecture (``L = len(block_out_channels)``, ``c_l = block_out_channels[l]``)::

    conv_in (3x3 -> c_0); time embedding Linear(SiLU(Linear(sinusoidal(t, c_0)))) of width 4 c_0
    (+ class embedding: a table of num_class_embeds rows, or an MLP of sinusoidal(y))
    down_blocks[l]: layers_per_block[l] x (ResnetBlock [+ Transformer2D if down_cross[l]]),
                    then a stride-2 conv unless l == L-1
    mid_block:      ResnetBlock, Transformer2D, ResnetBlock            (UNetMidBlock2DCrossAttn)
    up_blocks[i] (level L-1-i): (layers_per_block[L-1-i] + 1) x (concat skip, ResnetBlock
                    [+ Transformer2D if up_cross[i]]), then nearest x2 + 3x3 conv unless i == L-1
    GroupNorm, SiLU, conv_out (3x3 -> out_channels)

Transformer2D (one per attention site): GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or linear
over channels with ``use_linear_projection``) -> transformer_layers x BasicTransformerBlock ->
proj_out -> + input. BasicTransformerBlock: ``x += attn1(LN(x))`` (self), ``x += attn2(LN(x),
context)`` (cross), ``x += ff(LN(x))`` with the GEGLU feed-forward ``W2 (a * gelu(g))``,
``[a, g] = W1 x`` of width 4 * channels. Attention projections have no bias except the output.

Heads: ``num_heads[l]`` per level (the mid block uses the last level's, the up blocks mirror
the down blocks), head width ``c_l / num_heads[l]``. diffusers' config key
``attention_head_dim`` holds exactly these head *counts* (SD 1.x: 8 everywhere; SD 2.x:
(5, 10, 20, 20), i.e. 64-wide heads): a historical misnomer the importer follows.

Call: ``model(x, t, context, y=None)``; x [B, H, W, C] NHWC, t int [B], context [B, L, D].
Softmax and normalisation statistics are float32; ``dtype="bfloat16"`` computes everything
else in bf16 with float32 parameters; ``remat`` rematerialises each residual / transformer block.
Every convolution (the 1x1 projections too) is `ddx.models.layers.Conv`, so ``conv_impl``
picks its implementation per backend as in `ddx.models.UNet`. The constructor's arguments are
the fields of `ddx.models.configs.UNetCondConfig`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddx.models import dtypes
from ddx.models.attention import attention
from ddx.models.configs import UNetCondConfig
from ddx.models.layers import Conv, Downsample, GroupNorm, ResnetBlock, TimestepEmbedding, Upsample, batch_timesteps

Array = jax.Array


class CrossAttention(nnx.Module):
  """Multi-head attention of x [B, N, query_dim] over context [B, M, context_dim] (or x).

  ``to_q``/``to_k``/``to_v`` have no bias; ``to_out[0]`` does. Scale ``dim_head ** -0.5``,
  softmax in float32 (`ddx.models.attention.attention`).
  """

  def __init__(
    self,
    query_dim: int,
    context_dim: int | None,
    heads: int,
    dim_head: int,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.heads, self.dim_head = heads, dim_head
    self.to_q = nnx.Linear(query_dim, inner, use_bias=False, **kw)
    self.to_k = nnx.Linear(context_dim or query_dim, inner, use_bias=False, **kw)
    self.to_v = nnx.Linear(context_dim or query_dim, inner, use_bias=False, **kw)
    self.to_out = nnx.List([nnx.Linear(inner, query_dim, **kw)])

  def __call__(self, x: Array, context: Array | None = None) -> Array:
    ctx = x if context is None else context
    b, n, _ = x.shape
    h, d = self.heads, self.dim_head
    q = self.to_q(x).reshape(b, n, h, d)
    k = self.to_k(ctx).reshape(b, ctx.shape[1], h, d)
    v = self.to_v(ctx).reshape(b, ctx.shape[1], h, d)
    return self.to_out[0](attention(q, k, v).reshape(b, n, h * d))


class FeedForward(nnx.Module):
  """GEGLU feed-forward: ``out(a * gelu(g))`` with ``[a, g] = proj(x)`` (exact erf GELU)."""

  def __init__(self, dim: int, mult: int = 4, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, 2 * mult * dim, **kw)
    self.out = nnx.Linear(mult * dim, dim, **kw)

  def __call__(self, x: Array) -> Array:
    a, g = jnp.split(self.proj(x), 2, axis=-1)
    return self.out(a * jax.nn.gelu(g, approximate=False))


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

  def __init__(
    self,
    dim: int,
    heads: int,
    context_dim: int,
    *,
    eps: float = 1e-5,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if dim % heads:
      raise ValueError(f"num_heads: {heads} heads do not divide {dim} channels")
    self.norm1 = nnx.LayerNorm(dim, epsilon=eps, **kw)
    self.attn1 = CrossAttention(dim, None, heads, dim // heads, **kw)
    self.norm2 = nnx.LayerNorm(dim, epsilon=eps, **kw)
    self.attn2 = CrossAttention(dim, context_dim, heads, dim // heads, **kw)
    self.norm3 = nnx.LayerNorm(dim, epsilon=eps, **kw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x: Array, context: Array) -> Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
  """Spatial transformer: [B, H, W, C] x context [B, L, D] -> [B, H, W, C] (residual)."""

  def __init__(
    self,
    channels: int,
    heads: int,
    context_dim: int,
    num_layers: int,
    *,
    groups: int,
    linear_projection: bool,
    dtype=None,
    param_dtype=jnp.float32,
    conv_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = GroupNorm(channels, groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype)
    # A 1x1 conv and a linear layer compute the same map; they differ only in the stored
    # layout ([O, I, 1, 1] vs [O, I]), which the importer must reproduce. The convs' padding
    # is explicit (none) so that conv_impl may run them as products.
    if linear_projection:
      self.proj_in = nnx.Linear(channels, channels, **kw)
      self.proj_out = nnx.Linear(channels, channels, **kw)
    else:
      self.proj_in = Conv(channels, channels, (1, 1), padding=((0, 0), (0, 0)), impl=conv_impl, **kw)
      self.proj_out = Conv(channels, channels, (1, 1), padding=((0, 0), (0, 0)), impl=conv_impl, **kw)
    self.transformer_blocks = nnx.List(
      [BasicTransformerBlock(channels, heads, context_dim, **kw) for _ in range(num_layers)]
    )

  def __call__(self, x: Array, context: Array) -> Array:
    b, hh, ww, c = x.shape
    h = self.proj_in(self.norm(x)).reshape(b, hh * ww, c)
    for block in self.transformer_blocks:
      h = block(h, context)
    return x + self.proj_out(h.reshape(b, hh, ww, c))


class _Level(nnx.Module):
  def __init__(self, resnets, attentions, downsamplers=None, upsamplers=None):
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List(attentions) if attentions else None
    self.downsamplers = nnx.List(downsamplers) if downsamplers else None
    self.upsamplers = nnx.List(upsamplers) if upsamplers else None


class UNetCond(nnx.Module):
  """Text-conditional U-Net; see the module docstring.

  ``UNetCond(config, rngs=...)`` with a `UNetCondConfig` (its fields are documented there), or
  ``UNetCond(**fields, rngs=...)``; fields given with a config replace its values.
  ``model.config`` is the normalised config. ``rngs`` (``nnx.Rngs``) is for initialisation only.
  """

  def __init__(self, config: UNetCondConfig | None = None, *, rngs: nnx.Rngs, **fields):
    self.config = k = UNetCondConfig.of(config, **fields)
    cdtype, pdtype = dtypes.resolve(k)
    kw = dict(dtype=cdtype, param_dtype=pdtype)
    ckw = dict(kw, conv_impl=k.conv_impl)
    boc = k.block_out_channels
    nlev = len(boc)
    temb = 4 * boc[0]
    ctx = k.cross_attention_dim
    self.dtype = cdtype
    self.in_channels = k.in_channels
    self.cross_attention_dim = ctx
    self.num_levels = nlev
    self.remat = k.remat
    self.class_embed_type = k.class_embed_type
    self.num_class_embeds = k.num_class_embeds

    def res(cin, cout):
      return ResnetBlock(cin, cout, temb, groups=k.norm_num_groups, eps=k.norm_eps, dropout=0.0, rngs=rngs, **ckw)

    def xf(c, lev):
      return Transformer2D(
        c,
        k.num_heads[lev],
        ctx,
        k.transformer_layers[lev],
        groups=k.norm_num_groups,
        linear_projection=k.use_linear_projection,
        rngs=rngs,
        **ckw,
      )

    def conv3x3(cin, cout):
      return Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs, impl=k.conv_impl, **kw)

    def time_mlp():
      # float32, as in ddx.models.UNet (cheap; keeps t precise)
      return TimestepEmbedding(
        boc[0],
        temb,
        flip_sin_to_cos=k.flip_sin_to_cos,
        freq_shift=k.freq_shift,
        dtype=None,
        param_dtype=pdtype,
        rngs=rngs,
      )

    self.conv_in = conv3x3(k.in_channels, boc[0])
    self.time_embedding = time_mlp()
    if k.class_embed_type == "timestep":
      self.class_embedding = time_mlp()
    elif k.num_class_embeds:
      self.class_embedding = nnx.Embed(k.num_class_embeds, temb, param_dtype=pdtype, rngs=rngs)
    else:
      self.class_embedding = None

    skip = [boc[0]]
    cur = boc[0]
    down = []
    for lev in range(nlev):
      resnets, attns = [], []
      for _ in range(k.layers_per_block[lev]):
        resnets.append(res(cur, boc[lev]))
        cur = boc[lev]
        if k.down_cross[lev]:
          attns.append(xf(cur, lev))
        skip.append(cur)
      ds = None
      if lev != nlev - 1:
        ds = [Downsample(cur, with_conv=True, padding=k.downsample_padding, rngs=rngs, **ckw)]
        skip.append(cur)
      down.append(_Level(resnets, attns, downsamplers=ds))
    self.down_blocks = nnx.List(down)
    self.mid_block = _Level([res(cur, cur), res(cur, cur)], [xf(cur, nlev - 1)])
    up = []
    for i in range(nlev):
      lev = nlev - 1 - i
      resnets, attns = [], []
      for _ in range(k.layers_per_block[lev] + 1):
        resnets.append(res(cur + skip.pop(), boc[lev]))
        cur = boc[lev]
        if k.up_cross[i]:
          attns.append(xf(cur, lev))
      us = [Upsample(cur, with_conv=True, rngs=rngs, **ckw)] if i != nlev - 1 else None
      up.append(_Level(resnets, attns, upsamplers=us))
    self.up_blocks = nnx.List(up)
    assert not skip
    self.conv_norm_out = GroupNorm(cur, k.norm_num_groups, epsilon=k.norm_eps, **kw)
    self.conv_out = conv3x3(cur, k.out_channels)

  def _block(self, block, *args):
    if self.remat:
      return nnx.remat(lambda m, *a: m(*a))(block, *args)
    return block(*args)

  def check_inputs(self, x_shape, context_shape) -> None:
    """Shape validation (static); one-line ValueError naming the argument."""
    if len(x_shape) != 4 or x_shape[-1] != self.in_channels:
      raise ValueError(f"x: expected latents [B, H, W, {self.in_channels}], got shape {tuple(x_shape)}")
    div = 2 ** (self.num_levels - 1)
    if x_shape[1] % div or x_shape[2] % div:
      raise ValueError(f"x: height and width must be divisible by {div}, got {tuple(x_shape[1:3])}")
    if len(context_shape) != 3 or context_shape[-1] != self.cross_attention_dim:
      raise ValueError(f"context: expected [B, L, {self.cross_attention_dim}], got shape {tuple(context_shape)}")
    if context_shape[0] != x_shape[0]:
      raise ValueError(f"context: batch {context_shape[0]} differs from x's batch {x_shape[0]}")

  def __call__(self, x: Array, t: Array, context: Array, y: Array | None = None) -> Array:
    """Predict eps (or v, per training) for latents x at timesteps t given text context.

    Args:
      x: float [B, H, W, in_channels] (NHWC); H, W divisible by ``2 ** (levels - 1)``.
      t: int or float [B] (or a scalar), the model's timestep.
      context: float [B, L, cross_attention_dim] (text-encoder hidden states).
      y: class labels: int [B] in [0, num_class_embeds) for a table, a number [B] for
        ``class_embed_type="timestep"`` (e.g. a noise level); None for a model without.

    Returns:
      float32 [B, H, W, out_channels].
    """
    self.check_inputs(x.shape, context.shape)
    bsz = x.shape[0]
    t = batch_timesteps(t, bsz)
    if self.class_embedding is None:
      if y is not None:
        raise ValueError("y: class labels given but the model has no class embedding")
    else:
      if y is None:
        raise ValueError("y: this model is class-conditional; pass labels y of shape [B]")
      y = jnp.asarray(y)
      if y.shape != (bsz,):
        raise ValueError(f"y: expected shape [{bsz}], got {y.shape}")
      if self.class_embed_type != "timestep" and not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y: labels must be integers, got dtype {y.dtype}")
    emb = self.time_embedding(t)
    if self.class_embed_type == "timestep":
      emb = emb + self.class_embedding(y)
    elif self.class_embedding is not None:
      emb = emb + self.class_embedding(y.astype(jnp.int32)).astype(jnp.float32)

    cast = (lambda a: a.astype(self.dtype)) if self.dtype is not None else (lambda a: a)
    context = cast(context)
    h = self.conv_in(cast(x))
    hs = [h]
    for level in self.down_blocks:
      for i, resnet in enumerate(level.resnets):
        h = self._block(resnet, h, emb)
        if level.attentions is not None:
          h = self._block(level.attentions[i], h, context)
        hs.append(h)
      if level.downsamplers is not None:
        h = level.downsamplers[0](h)
        hs.append(h)
    mid = self.mid_block
    h = self._block(mid.resnets[0], h, emb)
    h = self._block(mid.attentions[0], h, context)
    h = self._block(mid.resnets[1], h, emb)
    for level in self.up_blocks:
      for i, resnet in enumerate(level.resnets):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = self._block(resnet, h, emb)
        if level.attentions is not None:
          h = self._block(level.attentions[i], h, context)
      if level.upsamplers is not None:
        h = level.upsamplers[0](h)
    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h.astype(jnp.float32)
