"""A data set's latents under a frozen autoencoder: what a latent diffusion model trains on.

The latents are the encoder's posterior *means*, computed once: the training set of the
diffusion model is then a fixed array (the batch at step k stays a function of (seed, k), so
a resumed run is exact), and with a small KL weight the posterior standard deviation is small
next to the spread of the means (`encode_source` returns it so the caller can report the
ratio), so a sample would differ from the mean by little more than noise the decoder was
trained to ignore.

The diffusion model sees scaled latents ``z * scaling_factor`` with, by default,
``scaling_factor = 1 / std(z)`` over every value of the training latents (the latent
diffusion paper's rescaling), so they have unit variance like the noise they are mixed with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx.data.arrays import ArraySource


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
  post = nnx.merge(graphdef, state).encode(x)
  return post.mean, post.std


def encode_source(vae, source, batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Posterior means and standard deviations of every record of ``source`` (unscaled latent
  space, float32 [N, h, w, c] each) and its labels int32 [N]."""
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise ValueError(f"batch: must be a positive integer, got {batch!r}")
  graphdef, state = nnx.split(vae)
  means, stds, labels = [], [], []
  for i in range(0, len(source), batch):
    ex = [source[j] for j in range(i, min(i + batch, len(source)))]
    x = jnp.asarray(np.stack([e["image"] for e in ex]), jnp.float32)
    m, s = jax.device_get(_encode(graphdef, state, x))
    means.append(m)
    stds.append(s)
    labels.extend(int(e["label"]) for e in ex)
  return np.concatenate(means), np.concatenate(stds), np.asarray(labels, np.int32)


def estimate_scaling_factor(latents: np.ndarray) -> float:
  """``1 / std`` of all values of ``latents`` (float64 accumulation)."""
  std = float(np.std(np.asarray(latents, np.float64)))
  if not np.isfinite(std) or std <= 0:
    raise ValueError(f"latents: their standard deviation must be finite and positive, got {std}")
  return 1.0 / std


def latent_source(means: np.ndarray, labels: np.ndarray, num_classes: int, scaling_factor: float) -> ArraySource:
  """The scaled latents ``means * scaling_factor`` as a training source."""
  return ArraySource(np.asarray(means, np.float32) * np.float32(scaling_factor), labels, num_classes)
