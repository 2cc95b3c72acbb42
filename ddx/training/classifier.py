"""A small noise-conditioned classifier p(y | x_t, t) for classifier guidance (`ddx.guidance.classifier`).

    clf = ddx.training.classifier.train(images, labels, sched, jax.random.key(0), num_classes=10)
    model_fn = ddx.guidance.classifier(eps_model, clf, labels, scale=2.0, sched=sched)

An MLP on the flattened image with a sinusoidal timestep embedding added before each hidden
activation: small enough to train on the embedded digits on a CPU in seconds, which is what
it is for (a U-Net encoder classifier, as in Dhariwal & Nichol, is the choice for real data).
Training is ddx's own machinery: the optimizer from `ddx.training.step.make_optimizer`, x_t from
`ddx.diffusion.q_sample`, t uniform over the schedule, every draw from ``fold_in(key, step)``,
the whole run one jitted ``lax.scan``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ddx import diffusion
from ddx.models.layers import timestep_embedding
from ddx.schedules import Schedule
from ddx.training import step as train_lib


class NoisyClassifier(nnx.Module):
  """``(x_t [B, ...], t [B]) -> logits [B, num_classes]``."""

  def __init__(self, image_shape, num_classes: int, *, hidden: int = 256, temb_dim: int = 64, rngs: nnx.Rngs):
    d = int(math.prod(image_shape))
    self.image_shape = tuple(int(s) for s in image_shape)
    self.temb_dim = temb_dim
    self.inp = nnx.Linear(d, hidden, rngs=rngs)
    self.temb1 = nnx.Linear(temb_dim, hidden, rngs=rngs)
    self.mid = nnx.Linear(hidden, hidden, rngs=rngs)
    self.temb2 = nnx.Linear(temb_dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    e = timestep_embedding(jnp.broadcast_to(t, (x.shape[0],)), self.temb_dim)
    h = jax.nn.silu(self.inp(x.reshape(x.shape[0], -1)) + self.temb1(e))
    h = jax.nn.silu(self.mid(h) + self.temb2(e))
    return self.out(h)


def train(
  images,
  labels,
  sched: Schedule,
  key: jax.Array,
  *,
  num_classes: int,
  steps: int = 2000,
  batch_size: int = 128,
  learning_rate: float = 2e-3,
  hidden: int = 256,
) -> NoisyClassifier:
  """Train a `NoisyClassifier` on (x_t, y) pairs: x_t = q_sample(x0, t, eps), t ~ U{0..T-1}.

  Args:
    images: float [N, ...] in the model's data range ([-1, 1]); labels: int [N] in [0, K).
    key: the run's key; parameters from ``fold_in(key, 0)``, step s draws from ``fold_in(key, s + 1)``.
    steps, batch_size, learning_rate, hidden: the run (Adam with a cosine decay, grad clip 1).
  """

  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim < 2 or images.shape[0] != labels.shape[0] or labels.ndim != 1:
    raise ValueError(f"labels: expected [N] matching images [N, ...], got {labels.shape} and {images.shape}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels: must lie in [0, {num_classes}), got min {labels.min()} max {labels.max()}")
  for name, v in (("steps", steps), ("batch_size", batch_size), ("hidden", hidden)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
  model = NoisyClassifier(
    images.shape[1:], num_classes, hidden=hidden, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0))
  )
  graphdef, params = nnx.split(model, nnx.Param)
  tx = train_lib.make_optimizer(
    train_lib.OptimizerSpec(
      learning_rate=learning_rate,
      warmup_steps=min(100, steps // 10),
      decay="cosine",
      total_steps=steps,
      final_lr_fraction=0.05,
    )
  )
  data_x, data_y = jnp.asarray(images), jnp.asarray(labels)
  T = sched.num_timesteps

  def loss_fn(params, k):
    idx = jax.random.randint(jax.random.fold_in(k, 0), (batch_size,), 0, data_x.shape[0])
    t = jax.random.randint(jax.random.fold_in(k, 1), (batch_size,), 0, T)
    eps = jax.random.normal(jax.random.fold_in(k, 2), (batch_size,) + data_x.shape[1:], jnp.float32)
    x_t = diffusion.q_sample(sched, data_x[idx], t, eps)
    logits = nnx.merge(graphdef, params)(x_t, t)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, data_y[idx]))

  def step(carry, s):
    params, opt = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, s + 1))
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), loss

  @jax.jit
  def run(params):
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
    return params, losses

  params, _ = run(params)
  return nnx.merge(graphdef, params)


def accuracy(model: NoisyClassifier, images, labels, sched: Schedule, t: int, key: jax.Array) -> float:
  """Top-1 accuracy on q_sample(images, t, normal(key))."""
  x0 = jnp.asarray(images, jnp.float32)
  tt = jnp.full((x0.shape[0],), t, jnp.int32)
  x_t = diffusion.q_sample(sched, x0, tt, jax.random.normal(key, x0.shape, jnp.float32))
  return float(jnp.mean(jnp.argmax(model(x_t, tt), -1) == jnp.asarray(labels)))
