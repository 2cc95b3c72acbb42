"""The shipped digits feature network (ddx/eval/digits_cnn.npz): held-out accuracy, retraining
is deterministic and reaches it, digits FD separates held-out digits from noise; the
reference-statistics cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddx import eval as ev
from ddx.eval import digits_net
from ddx.eval import features as feat_lib


@pytest.fixture(scope="module")
def splits():
  return digits_net.split_data()


@pytest.fixture(scope="module")
def net():
  return digits_net.load()


def test_split_is_fixed(splits):
  (xtr, ytr), (xte, yte) = splits
  assert xtr.shape == (1437, 16, 16, 1) and xte.shape == (360, 16, 16, 1)
  assert xtr.min() >= -1 and xtr.max() <= 1 and set(np.unique(yte)) == set(range(10))


def test_heldout_accuracy(splits):
  (_, _), (xte, yte) = splits
  assert digits_net.accuracy(digits_net.load_model(), xte, yte) >= 0.97


def _linear_cka(a: np.ndarray, b: np.ndarray) -> float:
  """Linear centered kernel alignment of two feature matrices [N, D]: 1 for feature spaces
  equal up to rotation and scale, near 0 for unrelated ones."""
  a, b = a - a.mean(0), b - b.mean(0)
  return float(np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def test_retraining_is_deterministic_on_one_machine(splits):
  """Two trainings with one key give identical weights here (bitwise). Across processors
  they need not: float arithmetic differs between instruction sets (AVX2 and AVX-512 gave
  1.9e-2 relative on one bias), which is why the weights ship with ddx."""
  (xtr, ytr), _ = splits
  a = digits_net.to_arrays(digits_net.train(jax.random.key(digits_net.TRAIN_SEED), xtr, ytr, epochs=3))
  b = digits_net.to_arrays(digits_net.train(jax.random.key(digits_net.TRAIN_SEED), xtr, ytr, epochs=3))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_retraining_reaches_the_shipped_network(splits):
  """The recipe reproduces what the shipped network is for, on any machine: held-out accuracy
  within 2 points of it and a feature space aligned with it. Bounds from retraining with
  other keys (2026-12-03, AMD EPYC Zen 4): accuracy 0.969-0.986 (shipped 0.983), linear CKA
  with the shipped features 0.91-0.93 (the shipped key: 1.0), FD(train, held-out) / trace
  0.015-0.018; a retraining with the shipped key on another processor is closer still."""
  (xtr, ytr), (xte, yte) = splits
  model = digits_net.train(jax.random.key(digits_net.TRAIN_SEED), xtr, ytr)
  shipped = digits_net.load_model()
  acc, acc_shipped = digits_net.accuracy(model, xte, yte), digits_net.accuracy(shipped, xte, yte)
  assert acc >= acc_shipped - 0.02 and acc >= 0.96, (acc, acc_shipped)
  f_te = np.asarray(model.features(jnp.asarray(xte)))
  assert _linear_cka(f_te, np.asarray(shipped.features(jnp.asarray(xte)))) >= 0.85
  f_tr = np.asarray(model.features(jnp.asarray(xtr)))
  assert ev.frechet_distance(f_tr, f_te) < 0.05 * np.trace(np.cov(f_tr, rowvar=False))


def test_digits_fd_small_for_heldout_large_for_noise(splits, net):
  (xtr, _), (xte, _) = splits
  f_tr = feat_lib.compute_features(net, xtr, batch_size=256)
  f_te = feat_lib.compute_features(net, xte, batch_size=256)
  noise = np.clip(np.random.default_rng(0).normal(0.0, 0.6, xte.shape), -1, 1).astype(np.float32) - 0.5
  f_noise = feat_lib.compute_features(net, noise, batch_size=256)
  assert f_tr.shape == (1437, 64)
  fd_floor = ev.frechet_distance(f_tr, f_te)
  fd_noise = ev.frechet_distance(f_tr, f_noise)
  scale = np.trace(np.cov(f_tr, rowvar=False))
  assert fd_floor < 0.05 * scale, (fd_floor, scale)
  assert fd_noise > 50 * fd_floor and fd_noise > scale, (fd_noise, fd_floor, scale)
  # same ordering for KID and precision / recall
  kid_floor = ev.kid(f_tr, f_te, jax.random.key(0), num_subsets=10, subset_size=300)[0]
  kid_noise = ev.kid(f_tr, f_noise, jax.random.key(0), num_subsets=10, subset_size=300)[0]
  assert kid_noise > 50 * abs(kid_floor)
  p, r = ev.precision_recall(f_tr, f_te)
  assert p > 0.9 and r > 0.9
  p, r = ev.precision_recall(f_tr, f_noise)
  assert p < 0.1


def test_feature_net_checks_input(net):
  with pytest.raises(ValueError, match="images: the digits feature network takes"):
    net(np.zeros((2, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="images: digits_cnn-[0-9a-f]{16} takes 1 channels"):
    net(np.zeros((2, 16, 16, 3), np.float32))
  assert net.name == f"digits_cnn-{digits_net.weights_hash(digits_net.to_arrays(digits_net.load_model()))[:16]}"


class _Sum(nnx.Module):
  def __call__(self, x):
    return jnp.stack([x[..., 0].sum((1, 2)), x[..., 1].sum((1, 2)), x[..., 2].sum((1, 2))], -1)


def test_grey_images_repeat_for_three_channel_nets():
  net = feat_lib.FeatureNet.from_module("sum", _Sum(), 3, channels=3)
  g = np.random.default_rng(1).normal(size=(4, 5, 5, 1)).astype(np.float32)
  f = np.asarray(net(g))
  np.testing.assert_allclose(f, np.repeat(g.sum((1, 2)), 3, axis=-1), rtol=1e-5, atol=1e-5)
  assert not np.allclose(f[:, 0], f[:, 0] * 0)  # a real signal, not zeros


def test_compute_features_batches_and_pads(net, splits):
  (_, _), (xte, _) = splits
  whole = np.asarray(net(xte[:70]))
  a = feat_lib.compute_features(net, xte[:70], batch_size=32)  # 32 + 32 + 6 (padded)
  b = feat_lib.compute_features(net, iter([xte[:50], xte[50:70]]), batch_size=32)
  np.testing.assert_allclose(a, whole, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b, whole, rtol=1e-5, atol=1e-6)


def test_reference_stats_cache(net, splits, tmp_path):
  (xtr, _), _ = splits
  calls = []

  def images():
    calls.append(1)
    return xtr

  kw = dict(cache_dir=str(tmp_path), dataset="digits", split="train", image_size=16, batch_size=256)
  ref = feat_lib.reference_stats(net, images, **kw)
  assert calls == [1] and ref.num == 1437 and ref.features.shape == (1437, 64)
  assert ref.path == str(tmp_path / f"{net.name}__digits-train-16.npz")
  np.testing.assert_allclose(ref.mu, ref.features.astype(np.float64).mean(0), rtol=1e-12)
  again = feat_lib.reference_stats(net, lambda: pytest.fail("recomputed a cached reference"), **kw)
  np.testing.assert_array_equal(again.sigma, ref.sigma)
  np.testing.assert_array_equal(again.features, ref.features)
  # another split or image size is another file
  feat_lib.reference_stats(net, images, **dict(kw, split="all"))
  assert calls == [1, 1]
  with pytest.raises(ValueError, match="split: must be a non-empty name"):
    feat_lib.reference_stats(net, images, **dict(kw, split="../x"))
