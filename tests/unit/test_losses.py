"""Training losses: targets, Min-SNR weighting as an x0-space identity, the hybrid VLB loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import diffusion, losses

SCHED = ddx.schedules.make("linear", 1000)


def _batch(seed=0, shape=(6, 4, 4, 3)):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x0 = jnp.tanh(jax.random.normal(k1, shape))
  eps = jax.random.normal(k2, shape)
  t = jnp.array([0, 3, 50, 400, 800, 999])
  return x0, eps, t, diffusion.q_sample(SCHED, x0, t, eps), k3


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_exact_target_gives_zero_and_mse_otherwise(prediction):
  x0, eps, t, xt, k = _batch()
  tgt = losses.target(SCHED, x0, t, eps, prediction)
  l0 = losses.diffusion_loss(SCHED, tgt, x0, xt, t, eps, prediction=prediction)
  chex.assert_trees_all_close(l0, jnp.zeros(6), atol=1e-12)
  d = 0.1 * jax.random.normal(k, x0.shape)
  l1 = losses.diffusion_loss(SCHED, tgt + d, x0, xt, t, eps, prediction=prediction)
  chex.assert_trees_all_close(l1, jnp.mean(d**2, axis=(1, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weighting_is_the_same_x0_space_objective(prediction):
  """min(SNR, gamma) |x0 - x0_hat|^2 whatever the target the model predicts."""
  gamma = 5.0
  x0, eps, t, xt, k = _batch(1)
  t = jnp.array([5, 50, 150, 300, 600, 900])  # ab not ~0, so x0_hat is well conditioned
  xt = diffusion.q_sample(SCHED, x0, t, eps)
  out = losses.target(SCHED, x0, t, eps, prediction) + 0.05 * jax.random.normal(k, x0.shape)
  loss = losses.diffusion_loss(
    SCHED, out, x0, xt, t, eps, prediction=prediction, weighting="min_snr", min_snr_gamma=gamma
  )
  a = SCHED.f64.alphas_cumprod[np.asarray(t)]
  x0_hat, _ = diffusion.to_x0_eps(out, xt, jnp.asarray(a, jnp.float32).reshape(-1, 1, 1, 1), prediction)
  snr = a / (1 - a)
  expect = np.minimum(snr, gamma) * np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(loss), expect, rtol=2e-3)


@pytest.mark.slow
def test_hybrid_loss_vlb_term():
  x0, eps, t, xt, _ = _batch(2)
  c = x0.shape[-1]
  # exact eps and the true posterior variance (frac = 0 -> log beta_tilde for t >= 1): KL = 0
  out = jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)
  loss = losses.diffusion_loss(SCHED, out, x0, xt, t, eps, learned_variance=True)
  assert float(loss[0]) > 0  # t = 0: decoder NLL in bits/dim is positive
  chex.assert_trees_all_close(loss[1:], jnp.zeros(5), atol=2e-4)
  # a wrong variance costs KL > 0, and equals the closed form Gaussian KL (independent numpy)
  out2 = jnp.concatenate([eps, jnp.full_like(eps, 0.5)], axis=-1)
  l2 = losses.diffusion_loss(SCHED, out2, x0, xt, t, eps, learned_variance=True, vlb_weight=1.0)
  b, ab = SCHED.f64.betas, SCHED.f64.alphas_cumprod
  for j in (1,):  # t = 3: beta_tilde and beta differ by 25 %, so the KL is far above rounding
    n = int(t[j])
    var_true = b[n] * (1 - ab[n - 1]) / (1 - ab[n])
    logvar_model = 0.75 * np.log(b[n]) + 0.25 * np.log(var_true)
    kl = 0.5 * (-1 + logvar_model - np.log(var_true) + var_true / np.exp(logvar_model))
    np.testing.assert_allclose(float(l2[j]), 1000 * kl / np.log(2), rtol=1e-3)
  # the VLB term does not push on the mean: its gradient w.r.t. the eps channels is zero
  g = jax.grad(
    lambda o: jnp.sum(
      losses.diffusion_loss(SCHED, o, x0, xt, t, eps, learned_variance=True)
      - losses.diffusion_loss(SCHED, o[..., :c], x0, xt, t, eps)
    )
  )(out2)
  chex.assert_trees_all_close(g[..., :c], jnp.zeros_like(eps), atol=1e-6)
  assert float(jnp.max(jnp.abs(g[..., c:]))) > 0


def test_training_loss_uses_the_key():
  x0, *_ = _batch(3)

  def model(x, t):
    return 0.5 * x

  a = losses.training_loss(model, SCHED, x0, jax.random.key(0))
  b = losses.training_loss(model, SCHED, x0, jax.random.key(0))
  c = losses.training_loss(model, SCHED, x0, jax.random.key(1))
  chex.assert_trees_all_equal(a, b)
  assert a.shape == (6,) and float(jnp.max(jnp.abs(a - c))) > 0


def test_bad_loss_args():
  x0, eps, t, xt, _ = _batch()
  with pytest.raises(ValueError, match="^prediction"):
    losses.diffusion_loss(SCHED, eps, x0, xt, t, eps, prediction="epsilon")
  with pytest.raises(ValueError, match="^weighting"):
    losses.diffusion_loss(SCHED, eps, x0, xt, t, eps, weighting="snr")
  with pytest.raises(ValueError, match="^model_output"):
    losses.diffusion_loss(SCHED, eps, x0, xt, t, eps, learned_variance=True)
  with pytest.raises(ValueError, match="^model_output"):
    losses.diffusion_loss(SCHED, eps[..., :2], x0, xt, t, eps)
