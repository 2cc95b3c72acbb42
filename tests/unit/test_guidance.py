"""Guidance wrappers: classifier-free guidance on learned-variance models, classifier guidance
(the formula, and samples moving toward the class with a classifier trained here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import ddx
from ddx.training import classifier as clf_lib
from tests._closed_form import Mixture

SCHED = ddx.schedules.make("linear", 1000)


def _class_model(x, t, y):
  """A model whose eps and variance channels both depend on the label (learned variance: 2C)."""
  yf = y.astype(jnp.float32)[:, None, None, None]
  tf = t.astype(jnp.float32)[:, None, None, None] / 1000.0
  eps = jnp.tanh(x + 0.1 * yf) * (1.0 + tf)
  var = jnp.sin(x * (yf + 1.0)) * 0.5
  return jnp.concatenate([eps, var], axis=-1)


def test_cfg_guides_the_prediction_and_passes_the_conditional_variance_through():
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
  t = jnp.array([10, 200, 500, 999], jnp.int32)
  y = jnp.array([0, 3, 7, 9], jnp.int32)
  null = 10
  for scale in (0.0, 1.0, 3.5):
    out = ddx.guidance.classifier_free(_class_model, y, null, scale)(x, t)
    cond, unc = _class_model(x, t, y), _class_model(x, t, jnp.full_like(y, null))
    assert out.shape == (4, 5, 5, 6)
    np.testing.assert_allclose(out[..., 3:], cond[..., 3:], atol=1e-6)  # variance: conditional, unscaled
    np.testing.assert_allclose(out[..., :3], unc[..., :3] + scale * (cond[..., :3] - unc[..., :3]), atol=1e-5)
  # same-shape outputs are guided whole, as before
  plain = lambda x, t, y: _class_model(x, t, y)[..., :3]
  np.testing.assert_allclose(
    ddx.guidance.classifier_free(plain, y, null, 2.0)(x, t),
    2.0 * plain(x, t, y) - plain(x, t, jnp.full_like(y, null)),
    atol=1e-5,
  )


def _linear_classifier(w):
  return jax.tree_util.Partial(lambda w, x, t: x.reshape(x.shape[0], -1) @ w * (1.0 + t[:, None] / 1000.0), w)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_classifier_guidance_formula(prediction):
  """eps' = eps - s sqrt(1 - ab[t]) grad log softmax(logits)[y], with the gradient by hand."""
  w = jax.random.normal(jax.random.key(1), (12, 4))
  clf = _linear_classifier(w)
  x = jax.random.normal(jax.random.key(2), (3, 12))
  t = jnp.array([5, 400, 900], jnp.int32)
  y = jnp.array([0, 2, 3], jnp.int32)
  model = lambda x, t: jnp.tanh(x) * 0.7
  out = ddx.guidance.classifier(model, clf, y, 2.5, SCHED, prediction=prediction)(x, t)
  a = SCHED.f64.alphas_cumprod[np.asarray(t)][:, None]
  xs, raw = np.asarray(x, np.float64), np.asarray(model(x, t), np.float64)
  wt = np.asarray(w, np.float64)[None] * (1.0 + np.asarray(t)[:, None, None] / 1000.0)  # [B, 12, 4]
  logits = np.einsum("bd,bdk->bk", xs, wt)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = wt[np.arange(3), :, np.asarray(y)] - np.einsum("bdk,bk->bd", wt, p)
  eps = {"eps": raw, "x0": (xs - np.sqrt(a) * raw) / np.sqrt(1 - a), "v": np.sqrt(a) * raw + np.sqrt(1 - a) * xs}[
    prediction
  ]
  eps_g = eps - 2.5 * np.sqrt(1 - a) * grad
  _, got_eps = ddx.diffusion.to_x0_eps(jnp.asarray(out), x, jnp.asarray(a, jnp.float32), prediction)
  np.testing.assert_allclose(np.asarray(got_eps), eps_g, rtol=2e-4, atol=2e-4)


def test_classifier_guidance_passes_variance_channels():
  clf = _linear_classifier(jax.random.normal(jax.random.key(3), (2 * 2 * 3, 4)))
  model = lambda x, t: _class_model(x, t, jnp.zeros((x.shape[0],), jnp.int32))
  x = jax.random.normal(jax.random.key(4), (2, 2, 2, 3))
  t = jnp.array([100, 700], jnp.int32)
  out = ddx.guidance.classifier(model, clf, jnp.array([1, 2]), 4.0, SCHED)(x, t)
  np.testing.assert_array_equal(np.asarray(out[..., 3:]), np.asarray(model(x, t)[..., 3:]))
  assert float(jnp.max(jnp.abs(out[..., :3] - model(x, t)[..., :3]))) > 1e-2


@pytest.mark.slow
def test_classifier_guidance_moves_samples_toward_the_class():
  """A time-conditioned classifier trained here on the digits (8x8) steers DDIM samples of the
  exact-eps Gaussian mixture fitted to the digit classes; the judge is the mixture's own exact
  posterior at t = 0 (independent of the classifier)."""
  d = load_digits()
  x = d.images.reshape(-1, 64) / 8.0 - 1.0
  labels = d.target
  perm = np.random.default_rng(0).permutation(len(x))
  tr, te = perm[:1500], perm[1500:]
  clf = clf_lib.train(x[tr], labels[tr], SCHED, jax.random.key(0), num_classes=10, steps=300, hidden=128)
  assert clf_lib.accuracy(clf, x[te], labels[te], SCHED, 0, jax.random.key(1)) > 0.9  # held out, clean
  assert clf_lib.accuracy(clf, x[te], labels[te], SCHED, 200, jax.random.key(1)) > 0.6  # held out, noisy
  means = np.stack([x[labels == k].mean(0) for k in range(10)])
  stds = np.array([np.sqrt(((x[labels == k] - means[k]) ** 2).mean()) for k in range(10)])
  mix = Mixture(SCHED, np.full(10, 0.1), means, stds)
  smp = ddx.samplers.make("ddim", SCHED, 20, clip_sample=False)
  n = 200
  y = jnp.asarray(np.arange(n) % 10, jnp.int32)
  x_T = jax.random.normal(jax.random.key(2), (n, 64))
  acc = []
  for scale in (0.0, 1.0, 4.0):
    out = ddx.sample(ddx.guidance.classifier(mix.eps, clf, y, scale, SCHED), smp, x_T)
    r = mix._parts(out, jnp.zeros((n,), jnp.int32))[3][..., 0]
    acc.append(float(jnp.mean(jnp.argmax(r, -1) == y)))
  # measured: 0.10, 0.70, 0.995 at scales 0, 1, 4 (classifier: 0.94 clean, 0.82 at t = 200)
  assert acc[0] < 0.2 and acc[1] > acc[0] + 0.3 and acc[2] > max(acc[1], 0.8), acc


def test_bad_guidance_args():
  with pytest.raises(ValueError, match="^prediction:"):
    ddx.guidance.classifier(lambda x, t: x, _linear_classifier(jnp.ones((4, 2))), [0], 1.0, SCHED, prediction="e")
  with pytest.raises(ValueError, match="^labels:"):
    clf_lib.train(np.zeros((4, 3)), np.array([0, 1, 2, 3]), SCHED, jax.random.key(0), num_classes=3)


def _plain_model(x, t, y):
  yf = y.astype(jnp.float32)[:, None, None, None]
  tf = t.astype(jnp.float32)[:, None, None, None] / 1000.0
  return jnp.tanh(x * (1.0 + 0.3 * yf)) * (1.0 + tf) + 0.05 * yf


def test_cfg_rescale_matches_diffusers():
  """`guidance.rescaled` = diffusers' ``rescale_noise_cfg`` (unbiased per-sample std)."""
  torch = pytest.importorskip("torch")
  sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 4))
  t = jnp.array([900, 900, 900], jnp.int32)
  y = jnp.array([1, 4, 8], jnp.int32)
  u = _plain_model(x, t, jnp.full_like(y, 10))
  c = _plain_model(x, t, y)
  for phi in (0.0, 0.3, 0.7, 1.0):
    ours = ddx.guidance.classifier_free(_plain_model, y, 10, 5.0, rescale=phi)(x, t)
    g = torch.from_numpy(np.asarray(u + 5.0 * (c - u)))
    ref = sd.rescale_noise_cfg(g, torch.from_numpy(np.asarray(c)), guidance_rescale=phi).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-5, atol=2e-6)
  # the rescaled output has the conditional output's per-sample std
  full = np.asarray(ddx.guidance.classifier_free(_plain_model, y, 10, 5.0, rescale=1.0)(x, t))
  np.testing.assert_allclose(full.reshape(3, -1).std(1, ddof=1), np.asarray(c).reshape(3, -1).std(1, ddof=1), rtol=1e-5)


def test_guidance_interval_guides_only_inside():
  sigmas = np.sqrt((1.0 - SCHED.f64.alphas_cumprod) / SCHED.f64.alphas_cumprod)
  y = jnp.array([2, 5], jnp.int32)
  guided = ddx.guidance.classifier_free(_plain_model, y, 10, 3.0)
  cond = ddx.guidance.conditional(_plain_model, y)
  lo, hi = float(sigmas[299] + sigmas[300]) / 2, float(sigmas[700] + sigmas[701]) / 2
  fn = jax.jit(ddx.guidance.interval(guided, cond, SCHED, lo, hi))
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  for t, inside in ((100, False), (299, False), (300, True), (500, True), (700, True), (701, False), (999, False)):
    tt = jnp.full((2,), t, jnp.int32)
    want = guided(x, tt) if inside else cond(x, tt)
    np.testing.assert_allclose(np.asarray(fn(x, tt)), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=str(t))
  # float timesteps (the σ-space samplers') interpolate σ
  t_f = jnp.full((2,), 300.4)
  np.testing.assert_allclose(np.asarray(fn(x, t_f)), np.asarray(guided(x, t_f)), rtol=1e-5, atol=1e-6)
  # sampling: an interval holding every level is plain CFG, one holding none is conditional
  smp = ddx.samplers.make("ddim", SCHED, 8)
  x_T = jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
  every = ddx.guidance.for_labels(_plain_model, 10, 2, y, 3.0, guidance_interval=(0.0, float("inf")), sched=SCHED)
  none = ddx.guidance.for_labels(_plain_model, 10, 2, y, 3.0, guidance_interval=(1e3, 1e4), sched=SCHED)
  np.testing.assert_allclose(ddx.sample(every, smp, x_T), ddx.sample(guided, smp, x_T), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ddx.sample(none, smp, x_T), ddx.sample(cond, smp, x_T), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "call,msg",
  [
    (lambda: ddx.guidance.classifier_free(_plain_model, [1], 10, 2.0, rescale=1.5), "rescale: must be in [0, 1]"),
    (lambda: ddx.guidance.classifier_free(_plain_model, [1], 10, 2.0, rescale=float("nan")), "rescale: must be"),
    (lambda: ddx.guidance.interval(None, None, SCHED, -1.0, 2.0), "interval: the low σ"),
    (lambda: ddx.guidance.interval(None, None, SCHED, 2.0, 2.0), "interval: the high σ"),
  ],
)
def test_guidance_option_errors(call, msg):
  with pytest.raises(ValueError, match="^" + msg.replace("[", r"\[").replace("]", r"\]")):
    call()
