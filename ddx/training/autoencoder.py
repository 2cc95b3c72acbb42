"""Training objective of the KL autoencoder (`ddx.models.AutoencoderKL`): reconstruction + KL.

Per example, with ``x`` an image [H, W, C] in [-1, 1], ``q = N(mean, exp(logvar))`` the
encoder's posterior, ``z ~ q`` one reparameterised sample and ``x_hat = decode(z)``::

    loss = (sum_pixels rec(x, x_hat) + kl_weight * KL(q || N(0, I))) / (H * W * C)

``rec`` is ``|x - x_hat|`` ("l1") or ``(x - x_hat)^2`` ("l2"); dividing by the pixel count
keeps the loss in per-pixel units while ``kl_weight`` keeps the meaning it has in the latent
diffusion paper (a weight on the summed KL against the summed reconstruction term). No
perceptual or adversarial term: digits are small enough for a pixel loss.

The step shares the optimizer update, EMA and non-finite skip with the diffusion step
(`ddx.training.step.apply_gradients`), so checkpoints have the same layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ddx import images as images_lib
from ddx import storage
from ddx.training import step as train_lib

RECONSTRUCTIONS = ("l1", "l2")
RECONSTRUCTION_FILE = "reconstruction.json"  # in the workdir, written by `report_reconstruction`


@dataclasses.dataclass(frozen=True)
class AutoencoderLossSpec:
  reconstruction: str = "l1"  # one of RECONSTRUCTIONS
  kl_weight: float = 1e-6


def autoencoder_loss(x: jax.Array, x_hat: jax.Array, kl: jax.Array, spec: AutoencoderLossSpec) -> jax.Array:
  """Per-example loss float32 [B] (see the module docstring); ``kl`` float32 [B] summed KL."""
  if spec.reconstruction not in RECONSTRUCTIONS:
    raise ValueError(f"reconstruction: must be one of {RECONSTRUCTIONS}, got {spec.reconstruction!r}")
  d = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
  rec = jnp.abs(d) if spec.reconstruction == "l1" else jnp.square(d)
  num_pixels = np.prod(x.shape[1:])
  return (jnp.sum(rec, axis=(1, 2, 3)) + spec.kl_weight * kl) / num_pixels


def train_step(
  state: train_lib.TrainState,
  batch: dict,
  *,
  graphdef,
  tx: optax.GradientTransformation,
  lr_fn: Callable,
  loss: AutoencoderLossSpec,
  ema_decay: float,
  ema_warmup: bool,
  param_shardings=None,
) -> tuple[train_lib.TrainState, dict]:
  """One step on ``{"image": [B, H, W, C] in [-1, 1], ...}`` (labels unused); pure.
  ``param_shardings``: as for `ddx.training.step.train_step` (FSDP).

  The posterior sample's noise comes from ``fold_in(fold_in(key, step), 1)``.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  x = batch["image"]

  def loss_fn(params):
    vae = nnx.merge(graphdef, params)
    post = vae.encode(x)
    x_hat = vae.decode(post.sample(jax.random.fold_in(key, 1)), scaled=False)
    return jnp.mean(autoencoder_loss(x, x_hat, post.kl(), loss))

  value, grads = jax.value_and_grad(loss_fn)(train_lib.gather_params(state.params, param_shardings))
  grads = train_lib.scatter_grads(grads, param_shardings)
  return train_lib.apply_gradients(state, value, grads, tx=tx, lr_fn=lr_fn, ema_decay=ema_decay, ema_warmup=ema_warmup)


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef, state, x):
  vae = nnx.merge(graphdef, state)
  post = vae.encode(x)
  return jnp.clip(vae.decode(post.mode(), scaled=False), -1.0, 1.0), post.mean, post.std


def reconstruct(vae, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Deterministic reconstructions (decode of the posterior mean), clipped to [-1, 1].

  Returns ``(x_hat [N, H, W, C], mean [N, h, w, c], std [N, h, w, c])`` as numpy (unscaled
  latent space).
  """
  graphdef, state = nnx.split(vae)
  outs = [
    jax.device_get(_reconstruct(graphdef, state, jnp.asarray(images[i : i + batch], jnp.float32)))
    for i in range(0, len(images), batch)
  ]
  return tuple(np.concatenate([o[k] for o in outs]) for k in range(3))


def reconstruction_metrics(images: np.ndarray, x_hat: np.ndarray) -> dict:
  """MSE and mean absolute error on the [-1, 1] scale, and PSNR in dB with peak-to-peak 2 (the
  PSNR of the same images on a [0, 1] scale), from the pooled MSE over all pixels."""
  d = np.asarray(x_hat, np.float64) - np.asarray(images, np.float64)
  mse = float(np.mean(d * d))
  return {
    "mse": mse,
    "mae": float(np.mean(np.abs(d))),
    "psnr_db": float(10.0 * np.log10(4.0 / mse)) if mse > 0 else float("inf"),
    "num": int(len(images)),
  }


def report_reconstruction(vae, held_out: np.ndarray, workdir: str, step: int) -> dict:
  """Held-out reconstruction error of ``vae`` (the workdir's EMA weights at ``step``; decode of
  the posterior mean) on images [N, H, W, C] in [-1, 1]. Writes ``<workdir>/reconstruction.json``
  and a grid ``<workdir>/samples/reconstructions_<step>.png`` (pairs of rows: originals, then
  their reconstructions), prints one line and returns the record."""
  x = held_out
  x_hat, mean, std = reconstruct(vae, x)
  rec = reconstruction_metrics(x, x_hat)
  rec.update(
    step=step,
    held_out=f"the last {len(x)} records of the data",
    latent_std=float(np.std(mean)),
    posterior_std_mean=float(np.mean(std)),
  )
  path = os.path.join(workdir, RECONSTRUCTION_FILE)
  storage.write_text(path, json.dumps(rec, indent=2, sort_keys=True) + "\n")
  n = min(len(x), 32)
  rows = []
  for i in range(0, n, 16):
    rows += [x[i : i + 16], x_hat[i : i + 16]]
  grid = images_lib.make_grid(images_lib.to_uint8(np.concatenate(rows)), ncols=min(n, 16))
  png = images_lib.save_png(os.path.join(workdir, "samples", f"reconstructions_{step:08d}.png"), grid, scale=4)
  print(
    f"held-out reconstruction ({rec['num']} images, step {step}, EMA weights, posterior mean): "
    f"MSE {rec['mse']:.5f}  PSNR {rec['psnr_db']:.2f} dB  MAE {rec['mae']:.4f}  -> {path}, {png}",
    flush=True,
  )
  return rec
