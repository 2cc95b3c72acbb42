"""Building blocks of the DDPM-family U-Net (flax.nnx, NHWC).

Conventions used throughout:

* Activations are NHWC: ``[B, H, W, C]``; time / class embeddings are ``[B, D]``.
* Every module takes ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``; ``None`` means
  float32) and ``param_dtype`` (the storage dtype of its parameters, float32 by default).
  Normalisation statistics and attention softmax are always computed in float32.
* Dropout never consumes hidden RNG state: a block receives an explicit PRNG key (or
  ``None`` for deterministic evaluation), see :func:`dropout`.

Parameter names mirror diffusers' ``UNet2DModel`` (``norm1``, ``conv1``, ``time_emb_proj``,
``to_q`` ...) so that weight conversion (`ddx.models.io.diffusers`) is a mechanical rename.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ddx.models.attention import attention

Array = jax.Array
Dtype = Any


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout with an explicit key; identity when ``key is None`` or ``rate == 0``."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def batch_timesteps(t, batch: int) -> Array:
  """Timesteps as [batch]: a scalar is broadcast; any other shape but [batch] is a ValueError."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (batch,))
  if t.shape != (batch,):
    raise ValueError(f"t: expected shape [{batch}], got {t.shape}")
  return t


def timestep_embedding(
  t: Array,
  dim: int,
  *,
  flip_sin_to_cos: bool = True,
  freq_shift: float = 0.0,
  max_period: float = 10000.0,
) -> Array:
  """Sinusoidal timestep embedding (DDPM / diffusers ``get_timestep_embedding``).

  Args:
    t: float or int array [B] (fractional timesteps allowed).
    dim: embedding width.
    flip_sin_to_cos: False gives ``[sin, cos]`` (original DDPM), True gives ``[cos, sin]``.
    freq_shift: frequencies are ``exp(-log(max_period) * i / (dim // 2 - freq_shift))``;
      the original DDPM uses ``freq_shift=1``.
    max_period: the longest period.

  Returns:
    float32 [B, dim] (zero-padded by one column when ``dim`` is odd).
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  freqs = jnp.exp(exponent)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GroupNorm(nnx.Module):
  """Group normalisation over (H, W, C/G) per group, with affine ``scale`` / ``bias`` [C].

  Statistics are computed in float32 (two-pass variance); the output has the compute
  dtype. ``x``: [B, ..., C] -> same shape.
  """

  def __init__(
    self,
    num_features: int,
    num_groups: int,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
  ):
    if num_features % num_groups:
      raise ValueError(f"norm_num_groups: {num_groups} does not divide {num_features} channels")
    self.num_features = num_features
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x: Array) -> Array:
    dtype = self.dtype or x.dtype
    shape = x.shape
    g = self.num_groups
    xg = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(dtype)


CONV_IMPLS = ("auto", "lax", "dots")

# What "auto" means on each backend (see docs/benchmarks.md, "Speed on CPU"): XLA's own convolution
# everywhere, except on the CPU for
# * 1x1 convolutions, in every dtype: XLA:CPU runs them at 50-150 GFLOP/s forward and 45-90
#   backward on a 2-core Zen 4, its dots at 80-190 and 85-150 (median 2x faster forward and
#   backward over the CIFAR-10 U-Net's shapes);
# * low-precision (bfloat16 / float16) convolutions with at least DOTS_MIN_CHANNELS input
#   channels: XLA:CPU has a fast bfloat16 x bfloat16 -> float32 dot but runs bfloat16
#   convolutions no faster than float32 ones (>= 256-channel 3x3: 0.3-0.9x the time of the
#   convolution op; 3x3 with 128 input channels and the 3-channel conv_out 1.4-6x, so those
#   stay on "lax"). Float32 3x3 convolutions run near XLA's dot ceiling and stay on "lax".
DOTS_MIN_CHANNELS = 256


def resolve_conv_impl(impl: str, dtype, in_channels: int, kernel_size: int = 3, backend: str | None = None) -> str:
  """The implementation ``impl`` stands for ("lax" or "dots") for a ``kernel_size`` square
  convolution with ``in_channels`` inputs and compute ``dtype`` (None = float32) on
  ``backend`` (default: ``jax.default_backend()``, read at trace time, so one model object
  picks per backend when it is jitted).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl: must be one of {CONV_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  low_precision = dtype is not None and jnp.dtype(dtype).itemsize < 4
  if backend == "cpu" and (kernel_size == 1 or (low_precision and in_channels >= DOTS_MIN_CHANNELS)):
    return "dots"
  return "lax"


@jax.custom_vjp
def _matmul_f32(a: Array, b: Array) -> Array:
  """``a @ b`` for 2-D ``a`` [M, K], ``b`` [K, N] of one dtype, accumulated and returned in
  float32. The backward products also take the inputs' dtype (the cotangent is rounded to
  it, as the output the caller rounds), so bfloat16 stays on the fast bf16 -> f32 path."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _matmul_f32_fwd(a, b):
  return _matmul_f32(a, b), (a, b)


def _matmul_f32_bwd(res, g):
  a, b = res
  g = g.astype(a.dtype)
  da = jnp.dot(g, b.T, preferred_element_type=jnp.float32).astype(a.dtype)
  db = jnp.dot(a.T, g, preferred_element_type=jnp.float32).astype(b.dtype)
  return da, db


_matmul_f32.defvjp(_matmul_f32_fwd, _matmul_f32_bwd)


def conv_as_dots(x: Array, kernel: Array, stride: int, padding) -> Array:
  """2-D cross-correlation (``lax.conv_general_dilated`` NHWC / HWIO) as matrix products.

  ``x`` [B, H, W, C], ``kernel`` [kh, kw, C, O] of one dtype, ``stride`` an int, ``padding``
  ``((top, bottom), (left, right))``. Returns float32 [B, H', W', O].

  A 1x1 kernel is one product. With stride 1, the ``kw`` column shifts are concatenated
  along channels ([B, H+pad, W', kw*C]) and multiplied once by the kernel laid out as
  [kw*C, kh*O]; output row r is the sum of the ``kh`` row-shifted slices of that product
  (``kh - 1`` extra rows per image are computed, 6% at 32x32). With a larger stride every
  (row, column) tap is gathered (im2col, [B, H', W', kh*kw*C]) and multiplied once.
  """
  kh, kw, c, o = kernel.shape
  (pt, pb), (pl, pr) = padding
  if (pt, pb, pl, pr) != (0, 0, 0, 0):
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  b, hp, wp, _ = x.shape
  oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  if kh == kw == 1:
    x = x[:, : (oh - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride, :]
    return _matmul_f32(x.reshape(-1, c), kernel.reshape(c, o)).reshape(b, oh, ow, o)
  if stride == 1:
    cols = jnp.concatenate([x[:, :, j : j + ow, :] for j in range(kw)], axis=-1)
    k = jnp.transpose(kernel, (1, 2, 0, 3)).reshape(kw * c, kh * o)
    z = _matmul_f32(cols.reshape(-1, kw * c), k).reshape(b, hp, ow, kh, o)
    y = z[:, 0:oh, :, 0]
    for i in range(1, kh):
      y = y + z[:, i : i + oh, :, i]
    return y
  span_h, span_w = (oh - 1) * stride + 1, (ow - 1) * stride + 1
  cols = jnp.concatenate(
    [x[:, i : i + span_h : stride, j : j + span_w : stride, :] for i in range(kh) for j in range(kw)], axis=-1
  )
  return _matmul_f32(cols.reshape(-1, kh * kw * c), kernel.reshape(kh * kw * c, o)).reshape(b, oh, ow, o)


class Conv(nnx.Conv):
  """``nnx.Conv`` (same parameters ``kernel`` [kh, kw, C, O] and ``bias`` [O], same init)
  with a choice of implementation for 2-D NHWC convolutions without dilation or groups:

  * ``"lax"``: ``nnx.Conv`` itself (XLA's convolution op in the compute dtype).
  * ``"dots"``: `conv_as_dots`, float32 accumulation and bias, rounded once to the compute
    dtype. Same values as "lax" up to summation order (float32) or rounding (bfloat16).
  * ``"auto"`` (default): chosen per backend when traced, see `resolve_conv_impl`.
  """

  def __init__(self, *args, impl: str = "auto", **kwargs):
    super().__init__(*args, **kwargs)
    resolve_conv_impl(impl, None, 1, backend="cpu")  # validate now
    self.impl = impl

  def _dots_supported(self) -> bool:
    pad = self.padding
    explicit = (
      isinstance(pad, (tuple, list))
      and len(pad) == 2
      and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pad)
    )
    strides = self.strides if isinstance(self.strides, (tuple, list)) else (self.strides,) * 2
    return (
      explicit
      and len(self.kernel_size) == 2
      and len(set(strides)) == 1
      and self.feature_group_count == 1
      and self.mask is None
      and self.input_dilation in (1, (1, 1))
      and self.kernel_dilation in (1, (1, 1))
    )

  def __call__(self, x: Array) -> Array:
    stride = self.strides if isinstance(self.strides, int) else self.strides[0]
    impl = resolve_conv_impl(self.impl, self.dtype, self.in_features, self.kernel_size[0])
    # "auto" never fails: a layout the products do not cover (string padding, dilation,
    # groups, a mask) stays on XLA's op; only an explicit "dots" insists
    if impl == "lax" or x.ndim != 4 or (self.impl == "auto" and not self._dots_supported()):
      return super().__call__(x)
    if not self._dots_supported():
      raise ValueError(
        f"conv_impl: 'dots' needs a 2-D convolution with explicit padding, equal "
        f"strides and no dilation, groups or mask, got {self.kernel_size} {self.padding}"
      )
    dtype = self.dtype or x.dtype
    kernel = self.kernel[...].astype(dtype)
    y = conv_as_dots(x.astype(dtype), kernel, stride, self.padding)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(dtype)


def _conv(cin, cout, k, *, stride=1, padding=None, dtype, param_dtype, rngs, impl="auto"):
  if padding is None:
    padding = ((k // 2, k // 2), (k // 2, k // 2))
  return Conv(
    cin,
    cout,
    (k, k),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
    impl=impl,
  )


def _linear(cin, cout, *, dtype, param_dtype, rngs):
  return nnx.Linear(cin, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class TimestepEmbedding(nnx.Module):
  """sinusoidal(t) -> Linear -> SiLU -> Linear. ``t``: [B] -> [B, emb_dim]."""

  def __init__(
    self,
    channels: int,
    emb_dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.channels = channels
    self.flip_sin_to_cos = flip_sin_to_cos
    self.freq_shift = freq_shift
    self.dtype = dtype
    self.linear_1 = _linear(channels, emb_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = _linear(emb_dim, emb_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, t: Array) -> Array:
    e = timestep_embedding(t, self.channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    if self.dtype is not None:
      e = e.astype(self.dtype)
    return self.linear_2(jax.nn.silu(self.linear_1(e)))


class ResnetBlock(nnx.Module):
  """DDPM residual block with additive time conditioning.

  ``h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))``;
  ``h = conv2(dropout(silu(norm2(h))))``; output ``shortcut(x) + h`` where ``shortcut``
  is a 1x1 conv when the channel count changes.

  ``x``: [B, H, W, in_channels], ``temb``: [B, temb_dim] -> [B, H, W, out_channels].
  ``temb_dim=None`` builds the unconditioned block of autoencoders (no ``time_emb_proj``;
  call it with ``temb=None``).
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    temb_dim: int | None,
    *,
    groups: int,
    eps: float,
    dropout: float,
    dtype=None,
    param_dtype=jnp.float32,
    conv_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.dropout_rate = float(dropout)
    self.norm1 = GroupNorm(in_channels, groups, epsilon=eps, **kw)
    self.conv1 = _conv(in_channels, out_channels, 3, rngs=rngs, impl=conv_impl, **kw)
    self.time_emb_proj = None if temb_dim is None else _linear(temb_dim, out_channels, rngs=rngs, **kw)
    self.norm2 = GroupNorm(out_channels, groups, epsilon=eps, **kw)
    self.conv2 = _conv(out_channels, out_channels, 3, rngs=rngs, impl=conv_impl, **kw)
    if in_channels != out_channels:
      self.conv_shortcut = _conv(in_channels, out_channels, 1, rngs=rngs, impl=conv_impl, **kw)
    else:
      self.conv_shortcut = None

  def __call__(self, x: Array, temb: Array, key: Array | None = None) -> Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = jax.nn.silu(self.norm2(h))
    h = dropout(h, self.dropout_rate, key)
    h = self.conv2(h)
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class AttentionBlock(nnx.Module):
  """Spatial self-attention with a residual connection (DDPM ``AttnBlock``).

  ``out = x + to_out(MHA(to_q(n), to_k(n), to_v(n)))`` with ``n = group_norm(x)`` and the
  H*W positions as the sequence (`ddx.models.attention.attention`: softmax in float32, scale
  ``head_dim ** -0.5``).
  ``x``: [B, H, W, C] -> [B, H, W, C].
  """

  def __init__(
    self, channels: int, num_heads: int, *, groups: int, eps: float, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    if channels % num_heads:
      raise ValueError(f"num_heads: {num_heads} does not divide {channels} channels")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.num_heads = num_heads
    self.group_norm = GroupNorm(channels, groups, epsilon=eps, **kw)
    self.to_q = _linear(channels, channels, rngs=rngs, **kw)
    self.to_k = _linear(channels, channels, rngs=rngs, **kw)
    self.to_v = _linear(channels, channels, rngs=rngs, **kw)
    self.to_out = _linear(channels, channels, rngs=rngs, **kw)

  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    nh = self.num_heads
    d = c // nh
    n = self.group_norm(x).reshape(b, hh * ww, c)
    q = self.to_q(n).reshape(b, -1, nh, d)
    k = self.to_k(n).reshape(b, -1, nh, d)
    v = self.to_v(n).reshape(b, -1, nh, d)
    o = attention(q, k, v).reshape(b, hh * ww, c)
    return x + self.to_out(o).reshape(b, hh, ww, c)


class Downsample(nnx.Module):
  """Halve H and W: 3x3 stride-2 conv (``with_conv``) or 2x2 average pooling.

  ``padding=1`` pads one pixel on every side (PyTorch / diffusers default);
  ``padding=0`` pads one pixel at the bottom / right only (TF "SAME", the original DDPM
  and the google/ddpm-* checkpoints). [B, H, W, C] -> [B, H/2, W/2, C].
  """

  def __init__(
    self,
    channels: int,
    *,
    with_conv: bool,
    padding: int = 1,
    dtype=None,
    param_dtype=jnp.float32,
    conv_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    self.with_conv = with_conv
    if with_conv:
      pad = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
      self.conv = _conv(
        channels, channels, 3, stride=2, padding=pad, dtype=dtype, param_dtype=param_dtype, rngs=rngs, impl=conv_impl
      )
    else:
      self.conv = None

  def __call__(self, x: Array) -> Array:
    if self.conv is not None:
      return self.conv(x)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class Upsample(nnx.Module):
  """Double H and W by nearest-neighbour, then an optional 3x3 conv.

  [B, H, W, C] -> [B, 2H, 2W, C].
  """

  def __init__(
    self,
    channels: int,
    *,
    with_conv: bool,
    dtype=None,
    param_dtype=jnp.float32,
    conv_impl: str = "auto",
    rngs: nnx.Rngs,
  ):
    self.with_conv = with_conv
    if with_conv:
      self.conv = _conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs, impl=conv_impl)
    else:
      self.conv = None

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    if self.conv is not None:
      x = self.conv(x)
    return x
