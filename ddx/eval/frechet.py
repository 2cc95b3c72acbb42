"""Fréchet distance between Gaussians fitted to two feature sets (FID when the features are
Inception pool3 activations).

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})

``S_a S_b`` is not symmetric, so its square root (what ``scipy.linalg.sqrtm`` computes) can
come out complex or NaN when a covariance is singular, e.g. with fewer samples than
dimensions. Here the trace term uses the identity ``tr((S_a S_b)^{1/2}) = tr((R S_b R)^{1/2})``
with ``R = S_a^{1/2}`` (both products have the same eigenvalues): ``R S_b R`` is symmetric
positive semi-definite, so its eigenvalues come from ``eigh`` and are real; eigenvalues at
the rounding level (``|w| <= eps * D * max|w|``, possibly negative) are set to 0 before the
square root.
Everything is float64 numpy.
"""

from __future__ import annotations

import numpy as np


def _clean_eigenvalues(w: np.ndarray) -> np.ndarray:
  # Eigenvalues of a PSD matrix computed in float64 carry absolute errors of about
  # eps * D * max|w|; below that they are rounding noise (possibly negative), and their square
  # roots (~1e-8 each) would dominate the error for singular covariances. Set them to 0.
  tol = np.finfo(np.float64).eps * w.shape[0] * max(float(np.max(np.abs(w), initial=0.0)), 0.0)
  return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(_clean_eigenvalues(w))) @ v.T


def _check_features(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected features [N, D], got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"{name}: need at least 2 feature vectors for a covariance, got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: features contain NaN or inf")
  return x


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
  x = _check_features("feats", feats)
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
  """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (float64).

  Args:
    mu_a, mu_b: means [D].
    sigma_a, sigma_b: symmetric positive semi-definite covariances [D, D] (they may be
      singular).

  Returns:
    The squared 2-Wasserstein distance between the two Gaussians, a python float >= 0
    (a tiny negative value from rounding is returned as 0).
  """
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
  if mu_a.ndim != 1 or mu_a.shape != mu_b.shape:
    raise ValueError(f"mu_b: expected the shape of mu_a {mu_a.shape} (both [D]), got {mu_b.shape}")
  d = mu_a.shape[0]
  for name, s in (("sigma_a", sigma_a), ("sigma_b", sigma_b)):
    if s.shape != (d, d):
      raise ValueError(f"{name}: expected a [{d}, {d}] covariance, got shape {s.shape}")
  for name, a in (("mu_a", mu_a), ("sigma_a", sigma_a), ("mu_b", mu_b), ("sigma_b", sigma_b)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name}: contains NaN or inf")
  # Symmetrise: a covariance accumulated in another order can be asymmetric by rounding.
  sigma_a = 0.5 * (sigma_a + sigma_a.T)
  sigma_b = 0.5 * (sigma_b + sigma_b.T)
  r = _psd_sqrt(sigma_a)
  m = r @ sigma_b @ r
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_sqrt = float(np.sum(np.sqrt(_clean_eigenvalues(eig))))
  diff = mu_a - mu_b
  fd = float(diff @ diff) + float(np.trace(sigma_a)) + float(np.trace(sigma_b)) - 2.0 * tr_sqrt
  return max(fd, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
  """Fréchet distance between Gaussians fitted to features ``[N_a, D]`` and ``[N_b, D]``.

  Mean and unbiased covariance of each set (N >= 2 each; N < D is fine). With at least D
  samples in both sets this is `frechet_distance_from_stats`. With fewer (the covariances
  are singular), the trace term is computed in sample space instead, exactly: writing
  ``S_a = A A^T`` and ``S_b = B B^T`` with ``A = X_a^T / sqrt(N_a - 1)`` (``X`` centred), the
  non-zero eigenvalues of ``S_a S_b`` are the squared singular values of ``A^T B``
  [N_a, N_b], so ``tr((S_a S_b)^{1/2})`` is its nuclear norm: an SVD of an N_a x N_b matrix
  instead of D x D eigendecompositions.
  """
  a = _check_features("feats_a", feats_a)
  b = _check_features("feats_b", feats_b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feats_b: expected {a.shape[1]} feature dimensions like feats_a, got {b.shape[1]}")
  (na, d), nb = a.shape, b.shape[0]
  if min(na, nb) >= d:
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))
  mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
  xa, xb = (a - mu_a) / np.sqrt(na - 1), (b - mu_b) / np.sqrt(nb - 1)
  tr_sqrt = float(np.sum(np.linalg.svd(xa @ xb.T, compute_uv=False)))
  diff = mu_a - mu_b
  fd = float(diff @ diff) + float(np.sum(xa * xa)) + float(np.sum(xb * xb)) - 2.0 * tr_sqrt
  return max(fd, 0.0)
