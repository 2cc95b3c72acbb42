"""Schedules: golden values (diffusers float32 vs exact float64), invariants, forward process, conversions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import diffusion

# exact float64 values (ab = alphas_cumprod at 0, 1, 499, 980, 999)
GOLDEN_F64 = {
  ("linear", None, None): [0.9999, 0.999780092072, 0.0785872428818, 5.90375137085e-05, 4.03582976538e-05],
  ("scaled_linear", 0.00085, 0.012): [0.99915, 0.998296027838, 0.277669650456, 0.00584378331868, 0.00466009851308],
  ("cosine", None, None): [0.999958715775, 0.999912575927, 0.493843590441, 0.00087652938196, 2.42876690703e-09],
}
# diffusers' float32 values (the reference the samplers are compared with)
GOLDEN_F32 = {
  "linear": [0.999899983, 0.999780059, 0.078587234, 5.90375203e-05, 4.03583035e-05],
  "scaled_linear": [0.999149978, 0.998296022, 0.27766943, 0.00584377907, 0.00466009509],
  "cosine": [0.999958694, 0.99991256, 0.493843466, 0.0008765292, 2.42873499e-09],
}
IDX = [0, 1, 499, 980, 999]


@pytest.mark.parametrize("name,bs,be", list(GOLDEN_F64))
def test_golden_values(name, bs, be):
  kw = {} if bs is None else {"beta_start": bs, "beta_end": be}
  s = ddx.schedules.make(name, 1000, **kw)
  np.testing.assert_allclose(s.f64.alphas_cumprod[IDX], GOLDEN_F64[(name, bs, be)], rtol=1e-10)
  # ddx's float32 copy is the rounded exact value; diffusers' float32 cumprod accumulates
  # error: <= 1e-6 relative, except 1.3e-5 at cosine's tiny ab[999] = 2.4e-9.
  rtol = np.array([2e-6] * 4 + [2e-5 if name == "cosine" else 2e-6])
  err = np.abs(np.asarray(s.alphas_cumprod, np.float64)[IDX] - GOLDEN_F32[name]) / np.array(GOLDEN_F32[name])
  assert np.all(err <= rtol), err
  assert s.alphas_cumprod.dtype == jnp.float32 and s.f64.alphas_cumprod.dtype == np.float64


def test_cosine_cap_and_linear_posterior_variance():
  c = ddx.schedules.make("cosine", 1000)
  b = c.f64.betas
  assert b[999] == 0.999 and b[998] < 0.999 and abs(b[998] - 0.75) < 0.01
  assert np.sum(b >= 0.999) == 1
  lin = ddx.schedules.make("linear", 1000)
  var = diffusion._tables(lin.f64)["posterior_variance"]
  np.testing.assert_allclose(var[[1, 999]], [5.4531876613e-05, 0.0199999835266], rtol=1e-9)
  assert var[0] == 0.0


def test_invariants_all_schedules():
  for name in ddx.schedules.SCHEDULE_NAMES:
    s = ddx.schedules.make(name, 1000)
    ab = s.f64.alphas_cumprod
    assert np.all(np.diff(ab) < 0), name
    assert 0 < ab[-1] < ab[0] < 1, name
    np.testing.assert_allclose(ab, np.cumprod(1 - s.f64.betas), rtol=0)
    np.testing.assert_allclose(s.f64.alphas_cumprod_prev, np.r_[1.0, ab[:-1]], rtol=0)


def test_sigmoid_and_explicit_betas():
  s = ddx.schedules.make("sigmoid", 1000, beta_start=1e-4, beta_end=0.02)
  b = s.f64.betas
  z = np.linspace(-6, 6, 1000)
  np.testing.assert_allclose(b, 1 / (1 + np.exp(-z)) * (0.02 - 1e-4) + 1e-4, rtol=1e-12)
  e = ddx.schedules.make(None, betas=b)
  np.testing.assert_array_equal(e.f64.alphas_cumprod, s.f64.alphas_cumprod)
  assert e.num_timesteps == 1000


def test_zero_terminal_snr():
  s = ddx.schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012, rescale_zero_snr=True)
  ab = s.f64.alphas_cumprod
  ref = ddx.schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012).f64.alphas_cumprod
  assert ab[-1] == 0.0 and s.zero_terminal_snr
  np.testing.assert_allclose(ab[0], ref[0], rtol=1e-12)  # first value kept
  r = np.sqrt(ab)
  # sqrt(ab) is an affine function of the original sqrt(ab)
  coef = np.polyfit(np.sqrt(ref), r, 1)
  np.testing.assert_allclose(np.polyval(coef, np.sqrt(ref)), r, atol=1e-12)


def test_schedule_is_a_pytree_with_static_host_copy():
  s = ddx.schedules.make("linear", 50)
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert all(l.dtype == jnp.float32 and l.shape == (50,) for l in leaves)
  f = jax.jit(lambda sc, t: sc.alphas_cumprod[t] + sc.f64.alphas_cumprod[3])
  np.testing.assert_allclose(float(f(s, 2)), s.f64.alphas_cumprod[2] + s.f64.alphas_cumprod[3], rtol=1e-6)
  assert hash(s.f64) == hash(ddx.schedules.make("linear", 50).f64)


@pytest.mark.parametrize(
  "kwargs,field",
  [
    (dict(name="nope"), "name"),
    (dict(name="linear", num_timesteps=0), "num_timesteps"),
    (dict(name="linear", beta_start=-0.1), "beta_start"),
    (dict(name="linear", beta_end=1.5), "beta_end"),
    (dict(name="cosine", beta_start=0.1), "beta_start"),
    (dict(name=None, betas=[0.1, 1.5]), "betas"),
    (dict(name=None, betas=[[0.1]]), "betas"),
    (dict(name="linear", betas=[0.1]), "name"),
  ],
)
def test_bad_schedule_args(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}"):
    ddx.schedules.make(**kwargs)


def test_forward_process_and_conversions():
  s = ddx.schedules.make("cosine", 1000)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (6, 4, 4, 2))
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 10, 500, 998, 999])
  xt = diffusion.q_sample(s, x0, t, eps)
  a = np.asarray(s.f64.alphas_cumprod[np.asarray(t)]).reshape(-1, 1, 1, 1)
  chex.assert_trees_all_close(xt, np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, rtol=1e-5, atol=2e-5)
  v = diffusion.velocity(s, x0, t, eps)
  af = jnp.asarray(a, jnp.float32)
  for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
    x0h, epsh = diffusion.to_x0_eps(out, xt, af, pred)
    # x0 is ill-conditioned where ab ~ 2e-9 (t = 999): compare where it is well posed
    chex.assert_trees_all_close(x0h[:5], x0[:5], atol=2e-3 if pred == "eps" else 1e-4)
    chex.assert_trees_all_close(epsh[1:], eps[1:], atol=1e-3 if pred == "x0" else 1e-4)
  chex.assert_trees_all_close(diffusion.v_from_eps_x0(eps, x0, af), v, atol=1e-5)
  snr = diffusion.snr(s, t)
  np.testing.assert_allclose(snr, (a / (1 - a)).ravel(), rtol=1e-5)


def test_posterior_matches_gaussian_conditioning():
  """q(x_{t-1} | x_t, x0) from Bayes' rule on the two Gaussians, computed independently."""
  s = ddx.schedules.make("linear", 1000)
  ab, b = s.f64.alphas_cumprod, s.f64.betas
  for n in (1, 5, 300, 999):
    # prior x_{n-1} ~ N(sqrt(ab[n-1]) x0, 1-ab[n-1]); likelihood x_n | x_{n-1} ~ N(sqrt(1-b) x_{n-1}, b)
    p_prec = 1 / (1 - ab[n - 1]) + (1 - b[n]) / b[n]
    var = 1 / p_prec
    x0, xt = 0.7, -0.4
    mean = var * (np.sqrt(ab[n - 1]) * x0 / (1 - ab[n - 1]) + np.sqrt(1 - b[n]) * xt / b[n])
    m, v, lv = diffusion.posterior_mean_variance(s, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([n]))
    np.testing.assert_allclose(float(m[0, 0]), mean, rtol=1e-5)
    np.testing.assert_allclose(float(v[0, 0]), var, rtol=1e-5)
    np.testing.assert_allclose(float(lv[0, 0]), np.log(var), rtol=1e-5)
  m, v, lv = diffusion.posterior_mean_variance(s, jnp.full((1, 1), 0.7), jnp.full((1, 1), -0.4), jnp.array([0]))
  assert float(m[0, 0]) == pytest.approx(0.7, rel=1e-6) and float(v[0, 0]) == 0.0
  assert np.isfinite(float(lv[0, 0]))
  # fixed_large: log beta (t = 0 entry replaced by log beta_tilde[1]); learned_range endpoints
  t = jnp.array([0, 7])
  lg = diffusion.model_log_variance(s, t, "fixed_large", like=jnp.zeros((2, 1)))
  var1 = b[1] * (1 - ab[0]) / (1 - ab[1])
  np.testing.assert_allclose(np.ravel(lg), [np.log(var1), np.log(b[7])], rtol=1e-5)
  for fill, kind in ((1.0, "fixed_large"), (-1.0, "fixed_small")):
    lr = diffusion.model_log_variance(
      s, jnp.array([7]), "learned_range", jnp.full((1, 1), fill), like=jnp.zeros((1, 1))
    )
    np.testing.assert_allclose(
      float(lr[0, 0]),
      float(diffusion.model_log_variance(s, jnp.array([7]), kind, like=jnp.zeros((1, 1)))[0, 0]),
      rtol=1e-6,
    )
