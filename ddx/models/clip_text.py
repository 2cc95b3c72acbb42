"""The CLIP text encoder (Radford et al. 2021; transformers ``CLIPTextModel``) in NNX.

token ids [B, L] -> ``(last_hidden_state [B, L, D], pooled [B, D])``::

    h = token_embedding[ids] + position_embedding[0..L-1]
    num_hidden_layers x:  h += out_proj(causal MHA(layer_norm1(h)))
                          h += fc2(act(fc1(layer_norm2(h))))        act: quick_gelu | gelu
    last_hidden_state = final_layer_norm(h)
    pooled = last_hidden_state at the end-of-text position of each row

The end-of-text position follows the two conventions of the reference: with the legacy
``eos_token_id == 2`` (configs written before transformers#24773) it is ``argmax(ids)`` (the
end token has the largest id in CLIP's vocabulary); otherwise the first position where
``ids == eos_token_id``. Stable Diffusion conditions on ``last_hidden_state``.

The encoder runs from token ids alone; tokenisation is the caller's (see `ddx.latent`). The
constructor's arguments are the fields of `ddx.models.configs.CLIPTextConfig`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx.models import dtypes
from ddx.models.attention import attention
from ddx.models.configs import CLIPTextConfig

Array = jax.Array


def _act(name: str, x: Array) -> Array:
  """The activations `ddx.models.configs.CLIP_ACTIVATIONS` names."""
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


class CLIPAttention(nnx.Module):
  """Causal multi-head self-attention (`ddx.models.attention.attention`), [B, L, D] -> [B, L, D]."""

  def __init__(self, dim: int, heads: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.q_proj = nnx.Linear(dim, dim, **kw)
    self.k_proj = nnx.Linear(dim, dim, **kw)
    self.v_proj = nnx.Linear(dim, dim, **kw)
    self.out_proj = nnx.Linear(dim, dim, **kw)

  def __call__(self, x: Array) -> Array:
    b, n, c = x.shape
    h = self.heads
    d = c // h
    q = self.q_proj(x).reshape(b, n, h, d)
    k = self.k_proj(x).reshape(b, n, h, d)
    v = self.v_proj(x).reshape(b, n, h, d)
    return self.out_proj(attention(q, k, v, causal=True).reshape(b, n, c))


class CLIPMLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.fc1 = nnx.Linear(dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, dim, **kw)

  def __call__(self, x: Array) -> Array:
    return self.fc2(_act(self.act, self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, dim, hidden, heads, act, eps, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = CLIPAttention(dim, heads, **kw)
    self.layer_norm1 = nnx.LayerNorm(dim, epsilon=eps, **kw)
    self.mlp = CLIPMLP(dim, hidden, act, **kw)
    self.layer_norm2 = nnx.LayerNorm(dim, epsilon=eps, **kw)

  def __call__(self, x: Array) -> Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nnx.Module):
  def __init__(self, vocab, positions, dim, *, param_dtype, rngs):
    self.token_embedding = nnx.Embed(vocab, dim, param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(positions, dim, param_dtype=param_dtype, rngs=rngs)


class _Encoder(nnx.Module):
  def __init__(self, layers):
    self.layers = nnx.List(layers)


class CLIPTextEncoder(nnx.Module):
  """CLIP text transformer; see the module docstring.

  ``CLIPTextEncoder(config, rngs=...)`` with a `CLIPTextConfig` (its fields mirror
  transformers' ``CLIPTextConfig``), or ``CLIPTextEncoder(**fields, rngs=...)``; fields given
  with a config replace its values. ``rngs`` (``nnx.Rngs``) is for initialisation only.
  """

  def __init__(self, config: CLIPTextConfig | None = None, *, rngs: nnx.Rngs, **fields):
    self.config = k = CLIPTextConfig.of(config, **fields)
    cdtype, pdtype = dtypes.resolve(k)
    kw = dict(dtype=cdtype, param_dtype=pdtype, rngs=rngs)
    self.dtype = cdtype
    self.vocab_size = k.vocab_size
    self.max_length = k.max_position_embeddings
    self.eos_token_id = k.eos_token_id
    d = k.hidden_size
    self.embeddings = _Embeddings(k.vocab_size, k.max_position_embeddings, d, param_dtype=pdtype, rngs=rngs)
    self.encoder = _Encoder(
      [
        CLIPEncoderLayer(d, k.intermediate_size, k.num_attention_heads, k.hidden_act, k.layer_norm_eps, **kw)
        for _ in range(k.num_hidden_layers)
      ]
    )
    self.final_layer_norm = nnx.LayerNorm(d, epsilon=k.layer_norm_eps, **kw)

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def check_ids(self, ids) -> None:
    """Shape / dtype (and, for concrete ids, range) checks; one-line ValueError."""
    if len(ids.shape) != 2:
      raise ValueError(f"ids: expected token ids [B, L], got shape {tuple(ids.shape)}")
    if ids.shape[1] > self.max_length:
      raise ValueError(
        f"ids: {ids.shape[1]} tokens exceed the text encoder's context of {self.max_length} (max_position_embeddings)"
      )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"ids: token ids must be integers, got dtype {ids.dtype}")
    if not isinstance(ids, jax.core.Tracer):
      a = np.asarray(ids)
      if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
        raise ValueError(f"ids: token ids must be in [0, {self.vocab_size}), got min {a.min()} max {a.max()}")

  def __call__(self, ids: Array) -> tuple[Array, Array]:
    """ids int [B, L] (L <= max_position_embeddings) -> (float32 [B, L, D], float32 [B, D])."""
    self.check_ids(ids)
    ids = jnp.asarray(ids, jnp.int32)
    n = ids.shape[1]
    emb = self.embeddings
    h = emb.token_embedding(ids) + emb.position_embedding(jnp.arange(n))[None]
    if self.dtype is not None:
      h = h.astype(self.dtype)
    for layer in self.encoder.layers:
      h = layer(h)
    h = self.final_layer_norm(h).astype(jnp.float32)
    if self.eos_token_id == 2:
      pos = jnp.argmax(ids, axis=-1)
    else:
      pos = jnp.argmax(ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(h, pos[:, None, None], axis=1)[:, 0]
    return h, pooled
