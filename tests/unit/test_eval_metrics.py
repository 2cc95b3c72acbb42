"""ddx.eval metrics on feature arrays: Fréchet distance, KID, precision/recall, each against a
closed form or an independent computation."""

import jax
import numpy as np
import pytest

from ddx import eval as ev
from ddx.eval import kernel_distance as kid_lib


def _rotation(d, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


def _random_cov(d, seed, rank=None):
  g = np.random.default_rng(seed).normal(size=(d, rank or d))
  return g @ g.T / d


# --- Fréchet distance ---------------------------------------------------------------------


@pytest.mark.parametrize("rotate", [False, True])
def test_fd_commuting_closed_form(rotate):
  d = 12
  rng = np.random.default_rng(0)
  mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.0, 2.0, d)
  b[:3] = 0.0  # singular sigma_b
  q = _rotation(d, 1) if rotate else np.eye(d)
  sa, sb = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  expect = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = ev.frechet_distance_from_stats(mu_a, sa, mu_b, sb)
  np.testing.assert_allclose(got, expect, rtol=1e-10)


def test_fd_non_commuting_vs_eigvals_of_product():
  # Reference computed another way: tr((S_a S_b)^{1/2}) = sum sqrt(eig(S_a S_b)) from the
  # non-symmetric product (its eigenvalues are real and >= 0 for SPD factors).
  d = 20
  sa, sb = _random_cov(d, 2), _random_cov(d, 3)
  assert np.abs(sa @ sb - sb @ sa).max() > 0.1  # really non-commuting
  rng = np.random.default_rng(4)
  mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
  lam = np.linalg.eigvals(sa @ sb)
  expect = np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.sum(np.sqrt(lam)).real
  got = ev.frechet_distance_from_stats(mu_a, sa, mu_b, sb)
  np.testing.assert_allclose(got, expect, rtol=1e-9)


def test_fd_features_match_stats_and_self_is_zero():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
  y = rng.normal(size=(300, 16)) + 0.3
  mu_x, s_x = x.mean(0), np.cov(x, rowvar=False)
  mu_y, s_y = y.mean(0), np.cov(y, rowvar=False)
  np.testing.assert_allclose(
    ev.frechet_distance(x, y), ev.frechet_distance_from_stats(mu_x, s_x, mu_y, s_y), rtol=1e-12
  )
  assert ev.frechet_distance(x, x) <= 1e-10 * np.trace(s_x)
  assert ev.frechet_distance(x, y) > 1.0


def test_fd_fewer_samples_than_dimensions():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))
  fd = ev.frechet_distance(x, y)  # the sample-space (SVD) path
  assert np.isfinite(fd) and fd >= 0.0
  stats = [v for z in (x, y) for v in (z.mean(0), np.cov(z, rowvar=False))]
  np.testing.assert_allclose(fd, ev.frechet_distance_from_stats(*stats), rtol=1e-9)  # the D x D path
  assert ev.frechet_distance(x, x) <= 1e-10 * np.trace(np.cov(x, rowvar=False))
  # rank-deficient covariances with the closed form of the commuting case
  sa, sb = _random_cov(32, 7, rank=3), np.zeros((32, 32))
  fd0 = ev.frechet_distance_from_stats(np.zeros(32), sa, np.zeros(32), sb)
  np.testing.assert_allclose(fd0, np.trace(sa), rtol=1e-10)


def test_fd_bad_input_one_line():
  with pytest.raises(ValueError, match="feats_b"):
    ev.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match="feats_a: need at least 2"):
    ev.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
  with pytest.raises(ValueError, match="sigma_b"):
    ev.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# --- KID ----------------------------------------------------------------------------------


def test_kid_textbook_small_case():
  # 1-D, k(a, b) = (a b + 1)^3 by hand: x = {0, 1}, y = {2, 3}
  # within x: 2 k(0,1) / 2 = 1;  within y: 2 k(2,3) / 2 = 7^3 = 343
  # cross: (k(0,2) + k(0,3) + k(1,2) + k(1,3)) = 1 + 1 + 27 + 64 = 93 -> 2 * 93 / 4 = 46.5
  x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
  assert kid_lib.mmd2_unbiased(x, y) == 1.0 + 343.0 - 46.5
  mean, std = ev.kid(x, y, jax.random.key(0), num_subsets=3, subset_size=10)  # capped at 2
  assert mean == 297.5 and std == 0.0


def test_kid_matches_pairwise_loop():
  rng = np.random.default_rng(8)
  x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 1
  k = lambda a, b: (np.dot(a, b) / 3 + 1) ** 3
  m = 5
  ref = (
    sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    + sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
  )
  mean, _ = ev.kid(x, y, jax.random.key(1), num_subsets=2, subset_size=5)  # all rows, permuted
  np.testing.assert_allclose(mean, ref, rtol=1e-12)


def test_kid_unbiased_and_positive():
  d, n = 8, 60
  means, biased = [], []
  for seed in range(40):
    rng = np.random.default_rng(100 + seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    means.append(ev.kid(x, y, jax.random.key(seed), num_subsets=5, subset_size=40)[0])
    kxx, kyy, kxy = (kid_lib.polynomial_kernel(a, b) for a, b in ((x, x), (y, y), (x, y)))
    biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())  # the V-statistic (diagonals kept)
  sem = np.std(means) / np.sqrt(len(means))
  assert abs(np.mean(means)) < 3 * sem, (np.mean(means), sem)
  assert np.mean(biased) > 10 * sem  # the biased estimator would fail the check above
  rng = np.random.default_rng(9)
  x, y = rng.normal(size=(200, d)), rng.normal(size=(200, d)) * 1.3 + 0.3
  mean, std = ev.kid(x, y, jax.random.key(2), num_subsets=20, subset_size=100)
  assert mean > 5 * std > 0


def test_kid_deterministic_in_key():
  rng = np.random.default_rng(10)
  x, y = rng.normal(size=(50, 4)), rng.normal(size=(60, 4))
  a = ev.kid(x, y, jax.random.key(3), num_subsets=4, subset_size=20)
  assert a == ev.kid(x, y, jax.random.key(3), num_subsets=4, subset_size=20)
  assert a != ev.kid(x, y, jax.random.key(4), num_subsets=4, subset_size=20)


# --- precision / recall -------------------------------------------------------------------


def test_precision_recall_identical_sets():
  x = np.random.default_rng(11).normal(size=(100, 5))
  assert ev.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


@pytest.mark.parametrize("k,expect", [(1, (0.4, 0.6)), (2, (0.4, 1.0))])
def test_precision_recall_constructed(k, expect):
  # On a line: real {0..4} (k=1 radii 1, so the real manifold is [-1, 5]); fake {0.5, 1.5, 7,
  # 8, 9} (k=1 radii 1: [-0.5, 2.5] u [6, 10]). k=1: precision 2/5 (0.5, 1.5), recall 3/5
  # (0, 1, 2). k=2: fake radii become 6.5, 5.5, 2, 1, 2, so [-6, 7] covers every real point.
  # Embedded along a random direction of R^6 with an offset (distances unchanged).
  u = _rotation(6, 12)[:, 0]
  off = np.random.default_rng(13).normal(size=6)
  emb = lambda t: np.asarray(t, np.float64)[:, None] * u[None] + off
  real, fake = emb([0, 1, 2, 3, 4]), emb([0.5, 1.5, 7, 8, 9])
  p, r = ev.precision_recall(real, fake, k=k)
  assert (p, r) == pytest.approx(expect, abs=1e-12)


def test_precision_recall_bad_k():
  with pytest.raises(ValueError, match="feats_real: need more than k=3"):
    ev.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
  with pytest.raises(ValueError, match="k: must be an int"):
    ev.precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), k=0)
