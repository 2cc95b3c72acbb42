"""Model-function wrappers for ``ddx.sample``: class conditioning and classifier-free guidance.

The wrappers are ``jax.tree_util.Partial`` objects, so the model's parameters travel into the
compiled sampling loop as arguments rather than constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["conditional", "classifier_free"]


def _conditional(model, y, x, t):
  return model(x, t, y)


def _cfg(model, y, null, scale, x, t):
  # one batched call on [uncond; cond] (the usual layout), then eps_u + w (eps_c - eps_u)
  b = x.shape[0]
  out = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([jnp.full_like(y, null), y]))
  u, c = out[:b], out[b:]
  return u + scale * (c - u)


def conditional(model, labels) -> jax.tree_util.Partial:
  """``(x, t) -> model(x, t, labels)``; labels int32 [B] or None (unconditional / null label)."""
  return jax.tree_util.Partial(_conditional, model, labels)


def classifier_free(model, labels, null_label: int, scale: float) -> jax.tree_util.Partial:
  """Classifier-free guidance ``out_u + scale (out_c - out_u)`` for any scale (1 = conditional only,
  0 = unconditional; unlike diffusers' pipelines, scales in (0, 1] are not silently ignored)."""
  return jax.tree_util.Partial(_cfg, model, jnp.asarray(labels, jnp.int32), int(null_label), jnp.float32(scale))


def _text_conditional(model, context, x, t):
  return model(x, t, context)


def _cfg_context(model, context, uncond, scale, x, t):
  # one batched call on [uncond; cond], as the Stable Diffusion pipelines do
  b = x.shape[0]
  out = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([uncond, context]))
  u, c = out[:b], out[b:]
  return u + scale * (c - u)


def text_conditional(model, context) -> jax.tree_util.Partial:
  """``(x, t) -> model(x, t, context)`` for a cross-attention model; context [B, L, D]."""
  return jax.tree_util.Partial(_text_conditional, model, jnp.asarray(context, jnp.float32))


def classifier_free_context(model, context, uncond_context, scale: float) -> jax.tree_util.Partial:
  """Classifier-free guidance over text contexts: ``out_u + scale (out_c - out_u)`` with
  ``out_c = model(x, t, context)`` and ``out_u = model(x, t, uncond_context)`` (both [B, L, D];
  the unconditional one is usually the empty prompt's embedding), evaluated as one batch of 2B."""
  return jax.tree_util.Partial(_cfg_context, model, jnp.asarray(context, jnp.float32),
                               jnp.asarray(uncond_context, jnp.float32), jnp.float32(scale))
