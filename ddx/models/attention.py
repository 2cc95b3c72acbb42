"""Multi-head scaled dot-product attention, the one used by every ddx network.

``softmax(q k^T / sqrt(H) [+ causal mask]) v`` by `jax.nn.dot_product_attention`, which
keeps to what the networks computed with their own einsums before:

* the logits ``q k^T`` are accumulated in float32 (for bfloat16 / float16 inputs its XLA path
  multiplies with ``preferred_element_type=float32`` and the BF16_BF16_F32 / F16_F16_F32 dot
  algorithm), scaled in float32, and the softmax runs in float32;
* the probabilities are rounded to the inputs' dtype before the product with ``v``, whose
  result has the inputs' dtype;
* a causal mask sets the logits above the diagonal to ``-0.7 * float32 max`` (the einsum code
  used the float32 minimum): both are exactly 0 after the softmax, whose rows always keep
  their diagonal.

``implementation`` is left to jax (None): in jax 0.10 that is its XLA path on every backend;
cuDNN's fused kernel has to be asked for by name and takes only half-precision inputs.
"""

from __future__ import annotations

import jax

Array = jax.Array


def attention(q: Array, k: Array, v: Array, *, causal: bool = False) -> Array:
  """Attention of queries ``q`` [B, T, N, H] over keys ``k`` and values ``v`` [B, S, N, H].

  All three have one dtype; the result [B, T, N, H] has it too. ``causal``: query ``i`` sees
  keys ``0..i`` only (self-attention, T == S). Scale ``H ** -0.5``; logits and softmax in
  float32 (see the module docstring).
  """
  return jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal)
