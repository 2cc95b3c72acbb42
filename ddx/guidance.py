"""Model-function wrappers for ``ddx.sample``: class conditioning, classifier-free guidance and
classifier guidance.

The wrappers are ``jax.tree_util.Partial`` objects, so the model's parameters travel into the
compiled sampling loop as arguments rather than constants. A model output with twice the
channels of x (channels-last) carries a learned variance in its second half: guidance acts on
the first half (eps / x0 / v) only and passes the variance channels of the conditional branch
through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ddx import diffusion

__all__ = [
  "conditional",
  "classifier_free",
  "rescaled",
  "interval",
  "classifier",
  "text_conditional",
  "classifier_free_context",
  "for_labels",
  "default_labels",
]


def _conditional(model, y, x, t):
  return model(x, t, y)


def _split(out, x):
  """(prediction channels, variance channels or None) of a model output for sample x."""
  c = x.shape[-1]
  if out.shape[-1] == 2 * c and out.shape[:-1] == x.shape[:-1]:
    return out[..., :c], out[..., c:]
  return out, None


def rescaled(guided, cond, phi):
  """CFG rescale (Lin et al. 2024, §3.4): ``phi * guided * std(cond) / std(guided) + (1 - phi)
  * guided``, the standard deviations per sample over all other axes (unbiased, as diffusers'
  ``rescale_noise_cfg``). It undoes the variance that a large guidance scale adds."""
  axes = tuple(range(1, guided.ndim))
  ratio = jnp.std(cond, axis=axes, keepdims=True, ddof=1) / jnp.std(guided, axis=axes, keepdims=True, ddof=1)
  return phi * (guided * ratio) + (1.0 - phi) * guided


def _combine(u, c, scale, rescale):
  guided = u + scale * (c - u)
  return guided if rescale is None else rescaled(guided, c, rescale)


def _cfg(model, y, null, scale, rescale, x, t):
  # one batched call on [uncond; cond] (the usual layout), then out_u + w (out_c - out_u)
  b = x.shape[0]
  out = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([jnp.full_like(y, null), y]))
  (u, _), (c, var) = _split(out[:b], x), _split(out[b:], x)
  guided = _combine(u, c, scale, rescale)
  return guided if var is None else jnp.concatenate([guided, var], axis=-1)


def _check_rescale(rescale: float) -> float | None:
  if not (np.isfinite(rescale) and 0.0 <= rescale <= 1.0):
    raise ValueError(f"rescale: must be in [0, 1], got {rescale!r}")
  return None if rescale == 0 else float(rescale)


def conditional(model, labels) -> jax.tree_util.Partial:
  """``(x, t) -> model(x, t, labels)``; labels int32 [B] or None (unconditional / null label)."""
  return jax.tree_util.Partial(_conditional, model, labels)


def classifier_free(model, labels, null_label: int, scale: float, *, rescale: float = 0.0) -> jax.tree_util.Partial:
  """Classifier-free guidance ``out_u + scale (out_c - out_u)`` for any scale (1 = conditional only,
  0 = unconditional; unlike diffusers' pipelines, scales in (0, 1] are not silently ignored),
  optionally `rescaled` by ``rescale`` (phi in [0, 1]). Learned-variance channels come from
  the conditional branch, unguided."""
  phi = _check_rescale(rescale)
  return jax.tree_util.Partial(
    _cfg,
    model,
    jnp.asarray(labels, jnp.int32),
    int(null_label),
    jnp.float32(scale),
    None if phi is None else jnp.float32(phi),
  )


def _interval(guided_fn, cond_fn, log_sigmas, lo, hi, x, t):
  # σ of this call's timestep (the same for the whole batch), log-linear between integer t
  tf = t[0].astype(jnp.float32)
  sigma = jnp.exp(jnp.interp(tf, jnp.arange(log_sigmas.shape[0], dtype=jnp.float32), log_sigmas))
  return jax.lax.cond((sigma >= lo) & (sigma <= hi), guided_fn, cond_fn, x, t)


def interval(guided_fn, cond_fn, sched, lo: float, hi: float) -> jax.tree_util.Partial:
  """Guidance only where it helps (Kynkäänniemi et al. 2024): ``guided_fn(x, t)`` at the calls
  whose noise level ``σ = sqrt((1 - ab[t]) / ab[t])`` lies in [lo, hi], ``cond_fn(x, t)``
  (one model evaluation, not two) elsewhere. ``sched`` is the model's `ddx.Schedule`."""
  if not (np.isfinite(lo) and lo >= 0):
    raise ValueError(f"interval: the low σ must be a finite number >= 0, got {lo!r}")
  if not hi > lo:
    raise ValueError(f"interval: the high σ must exceed the low one ({lo}), got {hi!r}")
  ab = np.clip(sched.f64.alphas_cumprod, 2.0**-24, None)
  log_sigmas = jnp.asarray(0.5 * np.log((1.0 - ab) / ab), jnp.float32)
  return jax.tree_util.Partial(_interval, guided_fn, cond_fn, log_sigmas, jnp.float32(lo), jnp.float32(min(hi, 3e38)))


def for_labels(
  model,
  num_classes: int | None,
  num: int,
  labels=None,
  guidance_scale: float = 1.0,
  *,
  rescale: float = 0.0,
  guidance_interval: tuple[float, float] | None = None,
  sched=None,
):
  """``model_fn(x, t)`` for a batch of ``num`` of a possibly class-conditional ``model(x, t, y)``:
  unconditional (``num_classes`` None or 0), class-conditional (``labels`` int [num]; None = the
  null label ``num_classes``), or classifier-free guided when ``guidance_scale != 1`` (with
  ``rescale`` and, given ``sched``, a σ ``guidance_interval``)."""
  if not num_classes:
    return conditional(model, None)
  y = jnp.full((num,), num_classes, jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
  if guidance_scale != 1.0:
    guided = classifier_free(model, y, num_classes, guidance_scale, rescale=rescale)
    if guidance_interval is None:
      return guided
    return interval(guided, conditional(model, y), sched, *guidance_interval)
  return conditional(model, y)


def default_labels(num: int, num_classes: int | None, label: int | None = None) -> np.ndarray | None:
  """int32 [num] labels for a class-conditional model: ``label`` everywhere, else cycling
  0..num_classes-1; None for an unconditional model."""
  if not num_classes:
    return None
  if label is not None:
    return np.full((num,), label, np.int32)
  return (np.arange(num) % num_classes).astype(np.int32)


def _text_conditional(model, context, x, t):
  return model(x, t, context)


def _cfg_context(model, context, uncond, scale, rescale, x, t):
  # one batched call on [uncond; cond], as the Stable Diffusion pipelines do
  b = x.shape[0]
  out = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([uncond, context]))
  return _combine(out[:b], out[b:], scale, rescale)


def text_conditional(model, context) -> jax.tree_util.Partial:
  """``(x, t) -> model(x, t, context)`` for a cross-attention model; context [B, L, D]."""
  return jax.tree_util.Partial(_text_conditional, model, jnp.asarray(context, jnp.float32))


def classifier_free_context(
  model, context, uncond_context, scale: float, *, rescale: float = 0.0
) -> jax.tree_util.Partial:
  """Classifier-free guidance over text contexts: ``out_u + scale (out_c - out_u)`` with
  ``out_c = model(x, t, context)`` and ``out_u = model(x, t, uncond_context)`` (both [B, L, D];
  the unconditional one is usually the empty prompt's embedding), evaluated as one batch of 2B,
  optionally `rescaled` by ``rescale`` (diffusers' ``guidance_rescale``)."""
  phi = _check_rescale(rescale)
  return jax.tree_util.Partial(
    _cfg_context,
    model,
    jnp.asarray(context, jnp.float32),
    jnp.asarray(uncond_context, jnp.float32),
    jnp.float32(scale),
    None if phi is None else jnp.float32(phi),
  )


def _classifier_guided(model_fn, classifier_fn, y, scale, sqrt_a, sqrt_1ma, prediction, x, t):
  out = model_fn(x, t)
  pred, var = _split(out, x)
  shape = (-1,) + (1,) * (x.ndim - 1)
  sa, s1a = sqrt_a[t].reshape(shape), sqrt_1ma[t].reshape(shape)

  def log_p(xx):
    logp = jax.nn.log_softmax(classifier_fn(xx, t).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=-1))

  grad = jax.grad(log_p)(x.astype(jnp.float32))
  _, eps = diffusion.to_x0_eps_sqrt(pred.astype(jnp.float32), x, sa, s1a, prediction)
  eps = eps - scale * s1a * grad
  if prediction == "eps":
    new = eps
  else:
    x0 = (x - s1a * eps) / sa
    new = x0 if prediction == "x0" else sa * eps - s1a * x0
  new = new.astype(out.dtype)
  return new if var is None else jnp.concatenate([new, var], axis=-1)


def classifier(model_fn, classifier_fn, labels, scale: float, sched, prediction: str = "eps") -> jax.tree_util.Partial:
  """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 in its DDIM form):
  ``eps' = eps - scale sqrt(1 - ab[t]) grad_x log p(y | x_t, t)``.

  Args:
    model_fn: ``(x, t) -> output`` (eps / x0 / v per ``prediction``; learned-variance channels
      are passed through).
    classifier_fn: ``(x_t, t) -> logits [B, K]``, a noise-conditioned classifier (e.g.
      `ddx.training.classifier.NoisyClassifier`); a Partial or nnx.Module keeps its weights traced.
    labels: int [B], the class each sample is steered toward.
    scale: the guidance scale s (0 = unguided).
    sched: the model's `ddx.Schedule`.
    prediction: "eps" | "x0" | "v"; x0 / v outputs are converted to eps at x_t, guided and
      converted back.
  """
  if prediction not in diffusion.PREDICTIONS:
    raise ValueError(f"prediction: unknown prediction type {prediction!r}; expected one of {diffusion.PREDICTIONS}")
  if not np.isfinite(scale):
    raise ValueError(f"scale: must be finite, got {scale!r}")
  f = sched.f64.alphas_cumprod
  sqrt_a = jnp.asarray(np.sqrt(f).astype(np.float32))
  sqrt_1ma = jnp.asarray(np.sqrt(1.0 - f).astype(np.float32))
  return jax.tree_util.Partial(
    _classifier_guided,
    model_fn,
    classifier_fn,
    jnp.asarray(labels, jnp.int32),
    jnp.float32(scale),
    sqrt_a,
    sqrt_1ma,
    prediction,
  )
