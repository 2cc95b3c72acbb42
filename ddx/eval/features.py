"""Feature networks as one small interface, feature extraction in fixed-size batches, and the
on-disk cache of reference statistics.

A `FeatureNet` has a ``name`` that identifies the network *and its weights* (e.g.
``fid_inception-6726825d...`` or ``digits_cnn-<hash>``): reference statistics are only
comparable between runs that used the same name, so it is part of every cache key.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx import storage
from ddx.eval.frechet import feature_stats


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureNet:
  """A frozen feature network: ``net(images [B, H, W, C] in [-1, 1]) -> float32 [B, dim]``.

  ``channels`` is what the network takes; 1-channel images are repeated to 3 channels for a
  3-channel network. The weights are arguments of the jitted function, not constants.
  """

  name: str
  dim: int
  channels: int
  fn: Callable[[Any, jax.Array], jax.Array]
  state: Any

  @classmethod
  def from_module(cls, name: str, module: nnx.Module, dim: int, *, channels: int) -> "FeatureNet":
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return cls(name=name, dim=dim, channels=channels, fn=fn, state=state)

  def __call__(self, images) -> jax.Array:
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4:
      raise ValueError(f"images: expected [B, H, W, C], got shape {x.shape}")
    if x.shape[-1] == 1 and self.channels == 3:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != self.channels:
      raise ValueError(f"images: {self.name} takes {self.channels} channels, got shape {x.shape}")
    return self.fn(self.state, x)


def compute_features(net: FeatureNet, images, batch_size: int = 50) -> np.ndarray:
  """Features of images, float32 ``[N, net.dim]``.

  ``images``: an array [N, H, W, C] in [-1, 1], or an iterable of such batches. Every batch
  is run at ``batch_size`` rows (the last one zero-padded), so the network compiles once.
  """
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
  batches: Iterable = (
    [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    if isinstance(images, (np.ndarray, jax.Array))
    else images
  )
  out = []
  for b in batches:
    b = np.asarray(b, np.float32)
    for s in range(0, b.shape[0], batch_size):
      chunk = b[s : s + batch_size]
      n = chunk.shape[0]
      if n < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(net(chunk))[:n])
  if not out:
    raise ValueError("images: no images")
  return np.concatenate(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Reference:
  """Statistics of a feature network over a data split: mu [D], sigma [D, D] (float64),
  num (images), features (float32 [num, D], or None if not kept) and the cache file path."""

  mu: np.ndarray
  sigma: np.ndarray
  num: int
  features: np.ndarray | None
  path: str


_SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")


def reference_path(cache_dir: str, net_name: str, dataset: str, split: str, image_size: int) -> str:
  """``<cache_dir>/<net name>__<dataset>-<split>-<image_size>.npz``."""
  for arg, v in (("net.name", net_name), ("dataset", dataset), ("split", split)):
    if not isinstance(v, str) or not _SAFE.match(v):
      raise ValueError(f"{arg}: must be a non-empty name of [A-Za-z0-9._+-], got {v!r}")
  if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
    raise ValueError(f"image_size: must be an int >= 1, got {image_size!r}")
  return os.path.join(cache_dir, f"{net_name}__{dataset}-{split}-{int(image_size)}.npz")


def reference_stats(
  net: FeatureNet,
  images_fn: Callable[[], Any],
  *,
  cache_dir: str,
  dataset: str,
  split: str,
  image_size: int,
  batch_size: int = 50,
  keep_features: bool = True,
) -> Reference:
  """Statistics of ``net`` over a data split, computed once and cached as ``.npz``.

  Args:
    net: the feature network; its ``name`` (network + weights hash) is part of the key.
    images_fn: called only on a cache miss; returns the split's images (an array
      [N, H, W, C] in [-1, 1] or an iterable of batches).
    cache_dir: directory of the cache files (created if needed).
    dataset, split, image_size: the rest of the key (the images ``images_fn`` produces).
    batch_size: feature-extraction batch.
    keep_features: also store the features (KID and precision/recall need them; FD does not).

  The file is written atomically (`ddx.storage.write_bytes`); a cached file written without
  features is recomputed when ``keep_features`` asks for them.
  """
  path = reference_path(cache_dir, net.name, dataset, split, image_size)
  key = f"{net.name}|{dataset}|{split}|{int(image_size)}"
  if storage.isfile(path):
    with np.load(io.BytesIO(storage.read_bytes(path))) as z:
      if str(z["key"]) != key:
        raise ValueError(f"cache_dir: {path} holds statistics for {str(z['key'])!r}, expected {key!r}")
      if not keep_features or "features" in z:
        feats = np.asarray(z["features"]) if "features" in z else None
        return Reference(np.asarray(z["mu"]), np.asarray(z["sigma"]), int(z["num"]), feats, path)
  feats = compute_features(net, images_fn(), batch_size)
  if feats.shape[0] < 2:
    raise ValueError(f"images_fn: need at least 2 images for a covariance, got {feats.shape[0]}")
  mu, sigma = feature_stats(feats)
  arrays = dict(mu=mu, sigma=sigma, num=np.int64(feats.shape[0]), key=np.asarray(key))
  if keep_features:
    arrays["features"] = feats
  # atomic (a unique temporary file renamed, or one upload): several processes of one run
  # may miss the cache at once
  storage.save_npz(path, compressed=False, **arrays)
  return Reference(mu, sigma, int(feats.shape[0]), feats if keep_features else None, path)
