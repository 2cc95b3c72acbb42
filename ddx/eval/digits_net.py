"""An offline feature network for the embedded digits data: a small CNN classifier of
scikit-learn's digits whose penultimate layer (64-d, after ReLU) is the feature space of
"digits FD / KID / precision / recall".

* Data: ``ddx.data.DigitsSource(image_size=16)``, the images the digits configs train on
  (16x16x1 in [-1, 1]). Fixed split, no randomness: every 5th image (index % 5 == 0, 360
  images) is held out, the other 1437 train the classifier.
* Network (37k parameters, NHWC): conv3x3(16) - conv3x3/2(32) - conv3x3(32) - conv3x3/2(64),
  ReLU after each, global average pool, dense(64) + ReLU = the features, dense(10) = logits.
* Training (`train`): Adam 2e-3 with cosine decay, batch 64, 40 epochs, random shifts of up
  to 1 pixel; every random draw comes from ``fold_in`` of one explicit key.
* The weights ship with ddx as ``digits_cnn.npz``, written by

      python -m ddx.eval.digits_net          # trains (seconds), prints held-out accuracy, writes the file

  so no run ever trains the network, and the feature space is the same on every machine. The
  network's identity (`load` ``.name``) is ``digits_cnn-`` plus a hash of the weights, the
  key of cached reference statistics. Retraining is deterministic on one machine, but on
  another processor it reproduces the weights only approximately (float arithmetic differs
  between instruction sets); tests check that a retrained network reaches the shipped one's
  accuracy and feature space within stated bounds, never bitwise weights.
"""

from __future__ import annotations

import hashlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ddx.data.digits import DigitsSource
from ddx.eval.features import FeatureNet

IMAGE_SIZE = 16
FEATURE_DIM = 64
NUM_CLASSES = 10
HELDOUT_EVERY = 5
WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_cnn.npz")
TRAIN_SEED = 0

EPOCHS = 40
BATCH = 64
LEARNING_RATE = 2e-3
MAX_SHIFT = 1


class DigitsCNN(nnx.Module):
  """``images [B, 16, 16, 1] -> (logits [B, 10], features [B, 64])``."""

  def __init__(self, *, rngs: nnx.Rngs):
    conv = lambda i, o, s: nnx.Conv(i, o, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), rngs=rngs)
    self.conv1 = conv(1, 16, 1)
    self.conv2 = conv(16, 32, 2)
    self.conv3 = conv(32, 32, 1)
    self.conv4 = conv(32, 64, 2)
    self.hidden = nnx.Linear(64, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
      x = jax.nn.relu(layer(x))
    return jax.nn.relu(self.hidden(jnp.mean(x, axis=(1, 2))))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    f = self.features(x)
    return self.head(f), f


class _Features(nnx.Module):
  """The feature map alone, with an input check (what `load` wraps)."""

  def __init__(self, net: DigitsCNN):
    self.net = net

  def __call__(self, x):
    if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
      raise ValueError(
        f"images: the digits feature network takes [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 1] images in "
        f"[-1, 1], got shape {x.shape}"
      )
    return self.net.features(x)


def split_data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """``((train images, labels), (held-out images, labels))``: 1437 / 360 of the 1797 digits."""

  src = DigitsSource(image_size=IMAGE_SIZE)
  held = np.arange(len(src)) % HELDOUT_EVERY == 0
  return (src.images[~held], src.labels[~held]), (src.images[held], src.labels[held])


def _shift(x: jax.Array, key: jax.Array) -> jax.Array:
  """Translate each image by (dy, dx) in [-MAX_SHIFT, MAX_SHIFT]^2, filling with background (-1)."""
  b, h, w, _ = x.shape
  d = jax.random.randint(key, (b, 2), -MAX_SHIFT, MAX_SHIFT + 1)
  pad = jnp.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)), constant_values=-1.0)
  crop = lambda img, dy, dx: jax.lax.dynamic_slice(img, (MAX_SHIFT + dy, MAX_SHIFT + dx, 0), (h, w, 1))
  return jax.vmap(crop)(pad, d[:, 0], d[:, 1])


def train(key: jax.Array, images: np.ndarray, labels: np.ndarray, *, epochs: int = EPOCHS) -> DigitsCNN:
  """Train a `DigitsCNN` (deterministic given ``key``; see the module docstring)."""
  model = DigitsCNN(rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
  n = images.shape[0]
  steps_per_epoch = n // BATCH
  total = epochs * steps_per_epoch
  tx = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, total))
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, k):
    def loss_fn(p):
      logits, _ = nnx.merge(graphdef, p)(_shift(x, k))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  images, labels = jnp.asarray(images), jnp.asarray(labels)
  data_key, aug_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
  # A Python loop over one jitted step: on CPU a scanned backward pass of convolutions runs
  # far slower (see ddx.training.step.make_train_fn).
  for epoch in range(epochs):
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), n)
    for i in range(steps_per_epoch):
      idx = perm[i * BATCH : (i + 1) * BATCH]
      params, opt_state = step(
        params, opt_state, images[idx], labels[idx], jax.random.fold_in(aug_key, epoch * steps_per_epoch + i)
      )
  return nnx.merge(graphdef, params)


def accuracy(model: DigitsCNN, images: np.ndarray, labels: np.ndarray) -> float:
  logits, _ = jax.jit(lambda x: model(x))(jnp.asarray(images))
  return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


def to_arrays(model: DigitsCNN) -> dict[str, np.ndarray]:
  """Parameters as ``{"conv1.kernel": array, ...}`` (float32)."""
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      out[".".join(str(p) for p in path)] = np.asarray(var[...], np.float32)
  return out


def weights_hash(arrays: dict[str, np.ndarray]) -> str:
  """sha256 over names, shapes and float32 bytes in sorted order (not the zip file's bytes)."""
  h = hashlib.sha256()
  for k in sorted(arrays):
    v = np.ascontiguousarray(arrays[k], np.float32)
    h.update(f"{k}:{v.shape}".encode())
    h.update(v.tobytes())
  return h.hexdigest()


def from_arrays(arrays: dict[str, np.ndarray]) -> DigitsCNN:
  model = DigitsCNN(rngs=nnx.Rngs(0))  # placeholder values, all overwritten below
  expected = to_arrays(model)
  if sorted(arrays) != sorted(expected):
    raise ValueError(f"digits weights: expected parameters {sorted(expected)}, got {sorted(arrays)}")
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      key = ".".join(str(p) for p in path)
      if arrays[key].shape != expected[key].shape:
        raise ValueError(f"digits weights: {key} has shape {arrays[key].shape}, expected {expected[key].shape}")
      var[...] = jnp.asarray(arrays[key], jnp.float32)
  return model


def load_model(path: str = WEIGHTS_FILE) -> DigitsCNN:
  if not os.path.isfile(path):
    raise ValueError(f"digits weights: no file at {path!r}; write it with python -m ddx.eval.digits_net")
  with np.load(path) as z:
    return from_arrays({k: np.asarray(z[k]) for k in z.files})


def load(path: str = WEIGHTS_FILE) -> FeatureNet:
  """The digits feature network (64-d) as a `FeatureNet`; name ``digits_cnn-<hash[:16]>``."""
  model = load_model(path)
  name = f"digits_cnn-{weights_hash(to_arrays(model))[:16]}"
  return FeatureNet.from_module(name, _Features(model), FEATURE_DIM, channels=1)


def main(argv: list[str]) -> int:
  out = argv[0] if argv else WEIGHTS_FILE
  (xtr, ytr), (xte, yte) = split_data()
  model = train(jax.random.key(TRAIN_SEED), xtr, ytr)
  arrays = to_arrays(model)
  print(
    f"train accuracy {accuracy(model, xtr, ytr):.4f}, held-out accuracy {accuracy(model, xte, yte):.4f} "
    f"({len(yte)} images); weights {weights_hash(arrays)[:16]}"
  )
  np.savez(out, **arrays)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
