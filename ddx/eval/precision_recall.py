"""Improved precision and recall (Kynkäänniemi et al. 2019) from k-NN manifold estimates.

Each set defines a manifold: the union of balls around its points, the radius of point i
being the distance to its k-th nearest neighbour within the same set (the point itself
excluded). Precision is the fraction of fake points inside the real manifold (how many
samples look real); recall is the fraction of real points inside the fake manifold (how much
of the real data the samples cover). A point on a ball's boundary counts as inside.
Distances are Euclidean, float64, computed in row blocks so memory stays O(block * N).
"""

from __future__ import annotations

import numpy as np

from ddx.eval.frechet import _check_features

_BLOCK = 1024


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
  return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
  """Squared distance from each row of x [N, D] to its k-th nearest other row -> [N]."""
  out = np.empty(x.shape[0])
  for s in range(0, x.shape[0], _BLOCK):
    d = _sq_dists(x[s : s + _BLOCK], x)
    # Column k of the sorted row: column 0 is the point itself (distance 0).
    out[s : s + _BLOCK] = np.partition(d, k, axis=1)[:, k]
  return out


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
  inside = 0
  for s in range(0, queries.shape[0], _BLOCK):
    d = _sq_dists(queries[s : s + _BLOCK], manifold)
    inside += int(np.sum(np.any(d <= radii[None, :], axis=1)))
  return inside / queries.shape[0]


def precision_recall(feats_real, feats_fake, k: int = 3) -> tuple[float, float]:
  """``(precision, recall)`` of fake features [M, D] against real features [N, D].

  Args:
    feats_real, feats_fake: feature arrays; each needs more than ``k`` rows.
    k: the neighbour defining each ball's radius (the paper uses 3).
  """
  if isinstance(k, bool) or int(k) != k or k < 1:
    raise ValueError(f"k: must be an int >= 1, got {k!r}")
  k = int(k)
  real = _check_features("feats_real", feats_real)
  fake = _check_features("feats_fake", feats_fake)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feats_fake: expected {real.shape[1]} feature dimensions like feats_real, got {fake.shape[1]}")
  for name, x in (("feats_real", real), ("feats_fake", fake)):
    if x.shape[0] <= k:
      raise ValueError(f"{name}: need more than k={k} feature vectors, got {x.shape[0]}")
  precision = _coverage(real, knn_radii(real, k), fake)
  recall = _coverage(fake, knn_radii(fake, k), real)
  return precision, recall
