"""Sample quality of a model: draw N samples in batches, embed them, and compare them with a
data split's cached reference statistics (Fréchet distance, KID, precision / recall).

    net = quality.feature_net("digits")
    ref = quality.reference_for_source(net, source, cache_dir=..., dataset="digits", split="train")
    fn = ddx.sampling.make_sample_fn(graphdef, sampler, num_classes, mesh)
    result = quality.measure(fn, params, image_shape=(16, 16, 1), num=1000, batch=250,
                             key=jax.random.key(0), net=net, reference=ref)

The ``eval`` command, the training loop (``train.eval_every``) and
benchmarks/quality_vs_steps.py share `measure`. Keys: batch b of the samples uses
``fold_in(fold_in(key, 0), b)`` (x_T and the sampler's noise derive from it, see
`ddx.sampling.make_sample_fn`), KID's subsets ``fold_in(key, 1)``; so two samplers measured
with one key start from the same x_T. In a multi-process run every process calls `measure`
(the sampling is sharded over all devices; the samples are gathered on every process), and
every process gets the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np

from ddx import guidance, parallel
from ddx.eval import digits_net, inception
from ddx.eval.features import FeatureNet, Reference, compute_features, reference_stats
from ddx.eval.frechet import feature_stats, frechet_distance_from_stats
from ddx.eval.kernel_distance import kid
from ddx.eval.precision_recall import precision_recall

FEATURES = ("digits", "inception")
PR_K = 3


class NonFiniteSamples(ValueError):
  """The model produced NaN or inf samples (nothing can be measured)."""


def check_features(features: str, image_shape, *, name: str = "features") -> None:
  """ValueError naming ``name`` unless ``features`` is known and fits images ``(H, W, C)``."""
  if features not in FEATURES:
    raise ValueError(f"{name}: must be one of {FEATURES}, got {features!r}")
  h, w, c = (int(d) for d in image_shape)
  if features == "digits" and (h, w, c) != (16, 16, 1):
    raise ValueError(f"{name}: digits takes 16x16x1 images; this model makes {h}x{w}x{c} (use inception)")


def feature_net(features: str, inception_weights: str | None = None) -> FeatureNet:
  """The feature network ``features`` (one of `FEATURES`); inception reads ``inception_weights``."""
  if features == "inception":
    if not inception_weights:
      raise ValueError("inception_weights: required for the inception features")
    return inception.load(inception_weights)
  if features == "digits":
    return digits_net.load()
  raise ValueError(f"features: must be one of {FEATURES}, got {features!r}")


def source_batches(source, batch: int) -> Iterator[np.ndarray]:
  """A random-access source's images (``source[i]["image"]``) as batches of ``batch``."""
  for s in range(0, len(source), batch):
    yield np.stack([source[i]["image"] for i in range(s, min(s + batch, len(source)))])


def reference_for_source(
  net: FeatureNet, source, *, cache_dir: str, dataset: str, split: str, batch: int = 250
) -> Reference:
  """`reference_stats` of a data source (its images are read only on a cache miss)."""
  return reference_stats(
    net,
    lambda: source_batches(source, batch),
    cache_dir=cache_dir,
    dataset=dataset,
    split=split,
    image_size=int(source.image_shape[0]),
    batch_size=batch,
  )


def draw(
  sample_fn: Callable,
  params: Any,
  *,
  image_shape,
  num: int,
  batch: int,
  key: jax.Array,
  labels=None,
  progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
  """``num`` samples, float32 ``[num, *image_shape]`` on the host (every process).

  ``sample_fn(params, key, shape, labels) -> [B, *image_shape]`` (`ddx.sampling.make_sample_fn`).
  Every call samples a full batch of ``min(batch, num)`` (the last one is cut), so it compiles
  once. ``labels`` int [>= ceil(num / bs) * bs] or None. ``progress(done, num)`` after each batch.
  """
  bs = min(int(batch), int(num))
  out = []
  for b in range(-(-num // bs)):
    lab = None if labels is None else labels[b * bs : (b + 1) * bs]
    shape = (bs,) + tuple(int(d) for d in image_shape)
    out.append(parallel.to_host(sample_fn(params, jax.random.fold_in(jax.random.fold_in(key, 0), b), shape, lab)))
    if progress is not None:
      progress(min((b + 1) * bs, num), num)
  return np.concatenate(out)[:num]


def metrics(feats: np.ndarray, reference: Reference, key: jax.Array, *, pr_k: int = PR_K) -> dict:
  """``{"fd", "kid_mean", "kid_std"[, "precision", "recall"]}`` of features [N, D] against a
  reference with features (precision / recall need N > ``pr_k``). KID's subsets use ``key``."""
  if reference.features is None:
    raise ValueError("reference: KID and precision / recall need its features (keep_features=True)")
  out = {"fd": frechet_distance_from_stats(*feature_stats(feats), reference.mu, reference.sigma)}
  out["kid_mean"], out["kid_std"] = kid(feats, reference.features, key)
  if feats.shape[0] > pr_k:
    out["precision"], out["recall"] = precision_recall(reference.features, feats, k=pr_k)
  return {k: float(v) for k, v in out.items()}


def measure(
  sample_fn: Callable,
  params: Any,
  *,
  image_shape,
  num: int,
  batch: int,
  key: jax.Array,
  net: FeatureNet,
  reference: Reference,
  num_classes: int | None = None,
  progress: Callable[[int, int], None] | None = None,
) -> dict:
  """Sample ``num`` images and measure them against ``reference`` in ``net``'s feature space.

  Args:
    sample_fn, params: `ddx.sampling.make_sample_fn`'s function and the weights it takes.
    image_shape: (H, W, C) of one sample.
    num: number of samples (>= 2); batch: sampling and feature batch size.
    key: the only source of randomness (see the module docstring).
    net, reference: the feature network and the data split's statistics under it.
    num_classes: a class-conditional model's classes (labels cycle 0..num_classes-1).
    progress: called as ``progress(done, num)`` after each sampled batch.

  Returns ``{"fd", "kid_mean", "kid_std", "precision", "recall", "num"}`` (floats; precision /
  recall only for num > 3). Raises `NonFiniteSamples` (a ValueError) if a sample is not finite.
  """
  if isinstance(num, bool) or int(num) != num or num < 2:
    raise ValueError(f"num: must be an int >= 2, got {num!r}")
  if isinstance(batch, bool) or int(batch) != batch or batch < 1:
    raise ValueError(f"batch: must be an int >= 1, got {batch!r}")
  bs = min(batch, num)
  labels = guidance.default_labels(-(-num // bs) * bs, num_classes, None)
  x = draw(sample_fn, params, image_shape=image_shape, num=num, batch=batch, key=key, labels=labels, progress=progress)
  bad = int(np.size(x) - np.isfinite(x).sum())
  if bad:
    raise NonFiniteSamples(f"samples: {bad} of {np.size(x)} values are not finite")
  feats = compute_features(net, np.clip(x, -1.0, 1.0), batch)
  return {**metrics(feats, reference, jax.random.fold_in(key, 1)), "num": int(num)}
