"""ddx.models.attention.attention (jax.nn.dot_product_attention) equals the einsum attention the
networks computed before it: float32 logits and softmax, probabilities rounded to the inputs'
dtype, an optional causal mask, query and key lengths that differ (cross-attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddx.models.attention import attention


def einsum_attention(q, k, v, causal=False):
  """What UNet's AttentionBlock, UNetCond's CrossAttention and CLIP's attention computed."""
  d = q.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d**-0.5
  if causal:
    n = q.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(jnp.float32).min)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def qkv(t, s, dtype, heads=2, dim=8, batch=2, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = 2.0 * jax.random.normal(kq, (batch, t, heads, dim))
  k = 2.0 * jax.random.normal(kk, (batch, s, heads, dim))
  v = jax.random.normal(kv, (batch, s, heads, dim))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


CASES = [
  (16, 16, False),  # spatial self-attention (U-Net, autoencoder)
  (16, 7, False),  # cross-attention over a shorter text context
  (5, 12, False),  # fewer queries than keys
  (9, 9, True),  # causal self-attention (CLIP)
]


@pytest.mark.slow
@pytest.mark.parametrize("t,s,causal", CASES)
def test_float32_equals_the_einsum_attention(t, s, causal):
  q, k, v = qkv(t, s, jnp.float32)
  ref = jax.jit(einsum_attention, static_argnums=3)(q, k, v, causal)
  got = jax.jit(attention, static_argnames="causal")(q, k, v, causal=causal)
  assert got.dtype == jnp.float32 and got.shape == (2, t, 2, 8)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("t,s,causal", CASES)
def test_bfloat16_equals_the_einsum_attention(t, s, causal):
  q, k, v = qkv(t, s, jnp.bfloat16)
  ref = jax.jit(einsum_attention, static_argnums=3)(q, k, v, causal)
  got = jax.jit(attention, static_argnames="causal")(q, k, v, causal=causal)
  assert got.dtype == jnp.bfloat16
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  # the same float32 logits and softmax, the same rounding of the probabilities to bfloat16:
  # the outputs may differ by the last bit of the bfloat16 result (2**-8 relative)
  np.testing.assert_allclose(got, ref, rtol=2**-8, atol=2**-8 * np.abs(ref).max())


def test_causal_mask_hides_the_future():
  q, k, v = qkv(6, 6, jnp.float32)
  out = attention(q, k, v, causal=True)
  # changing the keys / values of the last position leaves every earlier query alone
  k2, v2 = k.at[:, -1].add(5.0), v.at[:, -1].add(5.0)
  out2 = attention(q, k2, v2, causal=True)
  np.testing.assert_array_equal(np.asarray(out2[:, :-1]), np.asarray(out[:, :-1]))
  assert np.abs(np.asarray(out2[:, -1] - out[:, -1])).max() > 1e-2
