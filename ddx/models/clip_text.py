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

The encoder runs from token ids alone; tokenisation is the caller's (see `ddx.latent`).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx.models import dtypes

Array = jax.Array

ACTIVATIONS = ("quick_gelu", "gelu")


def _act(name: str, x: Array) -> Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


class CLIPAttention(nnx.Module):
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
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d**-0.5
    causal = jnp.tril(jnp.ones((n, n), bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, c))


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
  """CLIP text transformer; see the module docstring. Arguments mirror ``CLIPTextConfig``.

  Args:
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    max_position_embeddings, layer_norm_eps: the transformer's sizes (SD 1.x:
      49408, 768, 3072, 12, 12, 77, 1e-5).
    hidden_act: "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x).
    eos_token_id: the end-of-text id used for pooling; 2 selects the legacy argmax rule.
    dtype, param_dtype: compute / storage dtypes (outputs are float32).
    rngs: ``nnx.Rngs`` for initialisation only.
  """

  def __init__(
    self,
    *,
    vocab_size: int = 49408,
    hidden_size: int = 512,
    intermediate_size: int = 2048,
    num_hidden_layers: int = 12,
    num_attention_heads: int = 8,
    max_position_embeddings: int = 77,
    hidden_act: str = "quick_gelu",
    layer_norm_eps: float = 1e-5,
    eos_token_id: int = 2,
    dtype: Any = None,
    param_dtype: Any = "float32",
    rngs: nnx.Rngs,
  ):
    k = validate_clip_kwargs(
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      intermediate_size=intermediate_size,
      num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads,
      max_position_embeddings=max_position_embeddings,
      hidden_act=hidden_act,
      layer_norm_eps=layer_norm_eps,
      eos_token_id=eos_token_id,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self._kwargs_json = json.dumps(k, sort_keys=True)
    cdtype, pdtype = dtypes.resolve(k)
    kw = dict(dtype=cdtype, param_dtype=pdtype, rngs=rngs)
    self.dtype = cdtype
    self.vocab_size = k["vocab_size"]
    self.max_length = k["max_position_embeddings"]
    self.eos_token_id = k["eos_token_id"]
    d = k["hidden_size"]
    self.embeddings = _Embeddings(k["vocab_size"], k["max_position_embeddings"], d, param_dtype=pdtype, rngs=rngs)
    self.encoder = _Encoder(
      [
        CLIPEncoderLayer(
          d, k["intermediate_size"], k["num_attention_heads"], k["hidden_act"], k["layer_norm_eps"], **kw
        )
        for _ in range(k["num_hidden_layers"])
      ]
    )
    self.final_layer_norm = nnx.LayerNorm(d, epsilon=k["layer_norm_eps"], **kw)

  @property
  def kwargs(self) -> dict:
    return json.loads(self._kwargs_json)

  @property
  def hidden_size(self) -> int:
    return self.kwargs["hidden_size"]

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


def validate_clip_kwargs(**k) -> dict:
  """Check CLIPTextEncoder kwargs; return them normalised. One-line ValueError."""
  out = {}
  for name in (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
  ):
    v = k[name]
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name}: must be a positive int, got {v!r}")
    out[name] = int(v)
  if out["hidden_size"] % out["num_attention_heads"]:
    raise ValueError(
      f"num_attention_heads: {out['num_attention_heads']} does not divide hidden_size {out['hidden_size']}"
    )
  if k["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"hidden_act: must be one of {ACTIVATIONS}, got {k['hidden_act']!r}")
  out["hidden_act"] = k["hidden_act"]
  eps = k["layer_norm_eps"]
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f"layer_norm_eps: must be a positive float, got {eps!r}")
  out["layer_norm_eps"] = float(eps)
  eos = k["eos_token_id"]
  if not isinstance(eos, (int, np.integer)) or isinstance(eos, bool) or eos < 0:
    raise ValueError(f"eos_token_id: must be an int >= 0, got {eos!r}")
  out["eos_token_id"] = int(eos)
  out.update(dtypes.checked(k["dtype"], k["param_dtype"]))
  return out
