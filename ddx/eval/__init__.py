"""ddx.eval: sample-quality metrics on feature arrays and the feature networks behind them.

    import ddx.eval
    fd = ddx.eval.frechet_distance(feats_a, feats_b)           # FID on Inception pool3 features
    fd = ddx.eval.frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b)
    mean, std = ddx.eval.kid(feats_a, feats_b, key)            # unbiased MMD^2, cubic kernel
    precision, recall = ddx.eval.precision_recall(feats_real, feats_fake, k=3)

Metrics are float64 numpy on features ``[N, D]``. Feature networks (`FeatureNet`: images
[B, H, W, C] in [-1, 1] -> [B, D]): ``ddx.eval.inception.load(path)`` (pytorch-fid's FID
Inception, 2048-d, weights from a file you have) and ``ddx.eval.digits_net.load()`` (the
digits classifier shipped with ddx, 64-d). `reference_stats` caches a data split's statistics;
``ddx.eval.quality.measure`` samples a model and measures it (the eval command's core).
"""

from __future__ import annotations

import importlib

from ddx.eval.features import FeatureNet, Reference, compute_features, reference_stats
from ddx.eval.frechet import feature_stats, frechet_distance, frechet_distance_from_stats
from ddx.eval.kernel_distance import kid
from ddx.eval.precision_recall import precision_recall

_LAZY = ("inception", "digits_net", "quality")

__all__ = [
  "frechet_distance",
  "frechet_distance_from_stats",
  "feature_stats",
  "kid",
  "precision_recall",
  "FeatureNet",
  "Reference",
  "compute_features",
  "reference_stats",
  *_LAZY,
]


def __getattr__(name: str):
  if name in _LAZY:
    return importlib.import_module(f"ddx.eval.{name}")
  raise AttributeError(f"module 'ddx.eval' has no attribute {name!r}")
