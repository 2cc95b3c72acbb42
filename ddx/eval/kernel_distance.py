"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of the squared
maximum mean discrepancy (MMD^2) with the cubic polynomial kernel
``k(x, y) = (x . y / D + 1)^3``, averaged over random subsets.

For subsets ``X = {x_i}`` and ``Y = {y_j}`` of equal size m, the unbiased estimator is

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2

whose expectation is exactly MMD^2 (0 for two samples of one distribution; it can be
negative for one draw). Each subset draws m indices without replacement from each set, with
keys ``fold_in(fold_in(key, i), 0 | 1)`` for subset i; kernels are float64 numpy.
"""

from __future__ import annotations

import jax
import numpy as np

from ddx.eval.frechet import _check_features


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """``(x y^T / D + 1)^3`` for x [N, D], y [M, D] -> [N, M] (float64)."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 estimate (cubic polynomial kernel) between x [m, D] and y [m, D], m >= 2."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m = x.shape[0]
  if y.shape != x.shape or m < 2:
    raise ValueError(f"y: expected the shape of x {x.shape} with at least 2 rows, got {y.shape}")
  kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(within - 2.0 * kxy.sum() / (m * m))


def kid(feats_a, feats_b, key: jax.Array, num_subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
  """KID between features ``[N_a, D]`` and ``[N_b, D]``: mean and std of MMD^2_u over subsets.

  Args:
    feats_a, feats_b: feature arrays (N >= 2 each).
    key: PRNG key for the subset draws (the result is a pure function of it).
    num_subsets: number of subset pairs (the usual 100).
    subset_size: subset size m (the usual 1000), capped at ``min(N_a, N_b)``.

  Returns:
    ``(mean, std)`` as python floats; std is the population standard deviation over the
    subsets (ddof 0, as torch-fidelity and clean-fid report it).
  """
  a = _check_features("feats_a", feats_a)
  b = _check_features("feats_b", feats_b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feats_b: expected {a.shape[1]} feature dimensions like feats_a, got {b.shape[1]}")
  if isinstance(num_subsets, bool) or int(num_subsets) != num_subsets or num_subsets < 1:
    raise ValueError(f"num_subsets: must be an int >= 1, got {num_subsets!r}")
  if isinstance(subset_size, bool) or int(subset_size) != subset_size or subset_size < 2:
    raise ValueError(f"subset_size: must be an int >= 2, got {subset_size!r}")
  m = int(min(subset_size, a.shape[0], b.shape[0]))
  values = []
  for i in range(int(num_subsets)):
    k = jax.random.fold_in(key, i)
    ia = np.asarray(jax.random.choice(jax.random.fold_in(k, 0), a.shape[0], (m,), replace=False))
    ib = np.asarray(jax.random.choice(jax.random.fold_in(k, 1), b.shape[0], (m,), replace=False))
    values.append(mmd2_unbiased(a[ia], b[ib]))
  values = np.asarray(values)
  return float(values.mean()), float(values.std())
