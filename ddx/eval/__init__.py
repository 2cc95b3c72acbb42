"""ddx.eval: sample-quality metrics on feature arrays and the feature networks behind them.

    fd = ddx.eval.frechet_distance(feats_a, feats_b)             # FID on Inception features
    mean, std = ddx.eval.kid(feats_a, feats_b, key)
    precision, recall = ddx.eval.precision_recall(feats_real, feats_fake, k=3)

Metrics are float64 numpy; features are ``[N, D]`` arrays.
"""

from ddx.eval.frechet import feature_stats, frechet_distance, frechet_distance_from_stats
from ddx.eval.kernel_distance import kid
from ddx.eval.precision_recall import precision_recall

__all__ = ["feature_stats", "frechet_distance", "frechet_distance_from_stats", "kid", "precision_recall"]
