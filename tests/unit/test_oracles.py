"""Closed-form oracles for the samplers : exact results that do not depend on
any reference implementation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from tests._closed_form import Mixture, gaussian_ddim_gain

SCHED = ddx.schedules.make("linear", 1000)
AB = SCHED.f64.alphas_cumprod


def _noise(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# --- Gaussian data: DDIM eta = 0 has an exact per-step gain ---------------------------------


@pytest.mark.parametrize(
  "spacing,one",
  [("leading", True), ("leading", False), ("trailing", True), ("linspace", True), ("compvis_uniform", False)],
)
@pytest.mark.parametrize("S", [5, 25])
def test_ddim_gaussian_gain(spacing, one, S):
  mu, s2 = 0.3, 0.49
  m = Mixture(SCHED, [1.0], [[mu] * 3], [np.sqrt(s2)])
  smp = ddx.samplers.make("ddim", SCHED, S, spacing=spacing, set_alpha_to_one=one, clip_sample=False)
  x_T = _noise((16, 3))
  out = ddx.sample(m.eps, smp, x_T)
  ts = np.asarray(smp.timesteps)
  final = 1.0 if one else AB[0]
  g = gaussian_ddim_gain(AB, ts, final, s2)
  expect = np.sqrt(final) * mu + g * (np.asarray(x_T) - np.sqrt(AB[ts[0]]) * mu)
  chex.assert_trees_all_close(out, expect.astype(np.float32), atol=1e-5, rtol=1e-5)


# --- point mass: every deterministic sampler transports the same e_T --------------------------


@pytest.mark.parametrize(
  "name,kw",
  [
    ("ddim", dict(clip_sample=False)),
    ("plms", dict(set_alpha_to_one=True)),
    ("plms", dict(set_alpha_to_one=False)),
    ("dpm_solver++", dict()),
    ("dpm_solver++", dict(solver_type="heun", final_sigma="sigma_min")),
  ],
)
def test_point_mass_all_deterministic_samplers(name, kw):
  mu = np.array([0.5, -0.25], np.float32)
  m = Mixture(SCHED, [1.0], [mu], [0.0])
  smp = ddx.samplers.make(name, SCHED, 20, **kw)
  x_T = _noise((8, 2), 3)
  out = ddx.sample(m.eps, smp, x_T)
  t0 = int(smp.timesteps[0])
  e_T = (np.asarray(x_T) - np.sqrt(AB[t0]) * mu) / np.sqrt(1 - AB[t0])
  final = AB[0] if (kw.get("set_alpha_to_one") is False or kw.get("final_sigma") == "sigma_min") else 1.0
  expect = np.sqrt(final) * mu + np.sqrt(1 - final) * e_T
  chex.assert_trees_all_close(out, expect.astype(np.float32), atol=3e-5)


# --- Gaussian data: DDPM ancestral moments (Monte Carlo vs the exact recursion) -----------------


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_ancestral_moments(variance):
  mu, s2, S, N = 0.2, 0.25, 50, 200_000
  m = Mixture(SCHED, [1.0], [[mu]], [np.sqrt(s2)])
  smp = ddx.samplers.make("ddpm", SCHED, S, variance=variance, clip_sample=False)
  ts = np.asarray(smp.timesteps)
  # exact recursion for m_k = E x, V_k = Var x, starting from x_T ~ N(0, 1)
  mean, var = 0.0, 1.0
  for k, t in enumerate(ts):
    a = AB[t]
    ap = AB[ts[k + 1]] if k + 1 < len(ts) else 1.0
    beta = 1 - a / ap
    c1 = np.sqrt(ap) * beta / (1 - a)
    c2 = np.sqrt(a / ap) * (1 - ap) / (1 - a)
    kk = np.sqrt(a) * s2 / (a * s2 + 1 - a)  # x0*(x) = mu + kk (x - sqrt(a) mu)
    A = c1 * kk + c2
    b = c1 * (1 - kk * np.sqrt(a)) * mu
    step_var = ((1 - ap) / (1 - a) * beta if variance == "fixed_small" else beta) if t > 0 else 0.0
    mean, var = A * mean + b, A**2 * var + step_var
  x = ddx.sample(m.eps, smp, _noise((N, 1), 5), jax.random.key(11))
  x = np.asarray(x, np.float64)[:, 0]
  se_mean = np.sqrt(var / N)
  se_var = var * np.sqrt(2.0 / N)
  assert abs(x.mean() - mean) < 5 * se_mean, (x.mean(), mean)
  assert abs(x.var() - var) < 5 * se_var, (x.var(), var)


def test_ddpm_fixed_large_and_small_differ_as_predicted():
  """The recursion above distinguishes the variances (guards the moment test's power)."""
  smp_s = ddx.samplers.make("ddpm", SCHED, 50, variance="fixed_small")
  smp_l = ddx.samplers.make("ddpm", SCHED, 50, variance="fixed_large")
  assert float(jnp.max(jnp.abs(smp_s.std - smp_l.std))) > 0.05


# --- DDIM(eta=1, S=T) is DDPM fixed_small under identical noise --------------------------------


@pytest.mark.parametrize("clip,use_clipped", [(False, False), (True, True)])
def test_ddim_eta1_equals_ddpm_fixed_small(clip, use_clipped):
  m = Mixture(SCHED, [0.6, 0.4], [[0.5, -0.5], [-0.7, 0.2]], [0.3, 0.2])
  ddim = ddx.samplers.make("ddim", SCHED, 1000, eta=1.0, clip_sample=clip, use_clipped_model_output=use_clipped)
  ddpm = ddx.samplers.make("ddpm", SCHED, None, variance="fixed_small", clip_sample=clip)
  np.testing.assert_array_equal(np.asarray(ddim.timesteps), np.asarray(ddpm.timesteps))
  x_T = _noise((64, 2), 7)
  key = jax.random.key(42)
  a = ddx.sample(m.eps, ddim, x_T, key)
  b = ddx.sample(m.eps, ddpm, x_T, key)
  chex.assert_trees_all_close(a, b, atol=1e-4)
  # and a different key gives a different sample (the noise is really used)
  c = ddx.sample(m.eps, ddpm, x_T, jax.random.key(43))
  assert float(jnp.max(jnp.abs(c - b))) > 0.1


def test_ddim_eta_noise_is_added():
  """Unlike diffusers' removed Flax DDIM, eta > 0 really injects noise (different keys differ)."""
  m = Mixture(SCHED, [1.0], [[0.0, 0.0]], [0.5])
  smp = ddx.samplers.make("ddim", SCHED, 20, eta=0.5, clip_sample=False)
  x_T = _noise((4, 2))
  a = ddx.sample(m.eps, smp, x_T, jax.random.key(1))
  b = ddx.sample(m.eps, smp, x_T, jax.random.key(2))
  assert float(jnp.max(jnp.abs(a - b))) > 0.05


# --- Gaussian mixture: samples land on the components with the right frequencies ---------------


@pytest.mark.parametrize(
  "name,kw,max_off",
  [
    ("ddim", dict(clip_sample=False), 0.0),
    # PLMS's last steps extrapolate eps from earlier calls (AB4); with point masses eps* flips
    # direction when a sample's responsibility switches late, so ~3% land between components.
    ("plms", dict(set_alpha_to_one=True), 0.04),
    ("dpm_solver++", dict(), 0.0),
    ("ddpm", dict(clip_sample=False), 0.0),
  ],
)
def test_mixture_landing(name, kw, max_off):
  w = np.array([0.5, 0.3, 0.2])
  mus = np.array([[1.0, 1.0], [-1.0, 0.5], [0.2, -1.2]])
  m = Mixture(SCHED, w, mus, [0.0, 0.0, 0.0])
  smp = ddx.samplers.make(name, SCHED, 50 if name != "ddpm" else 250, **kw)
  N = 4000
  out = np.asarray(ddx.sample(m.eps, smp, _noise((N, 2), 9), jax.random.key(3)))
  d = np.linalg.norm(out[:, None, :] - mus[None], axis=-1)
  assert np.mean(d.min(axis=1) > 0.05) <= max_off, np.sort(d.min(axis=1))[-5:]
  freq = np.bincount(d.argmin(axis=1), minlength=3) / N
  se = np.sqrt(w * (1 - w) / N)
  assert np.all(np.abs(freq - w) < 4 * se), (freq, w)


# --- convergence order of the deterministic ODE samplers ---------------------------------------


def _ode_error(name, S, m, x_T, ref, **kw):
  smp = ddx.samplers.make(name, SCHED, S, spacing="trailing", **kw)
  return float(np.max(np.abs(np.asarray(ddx.sample(m.eps, smp, x_T)) - ref)))


@pytest.mark.slow
def test_convergence_orders():
  """Error against a fine solution shrinks like S^-p: DDIM p ~ 1, PLMS and DPM-Solver++ p > 1.5."""
  m = Mixture(SCHED, [0.5, 0.5], [[0.8], [-0.6]], [0.25, 0.35])
  x_T = _noise((256, 1), 13)
  fine = ddx.samplers.make("dpm_solver++", SCHED, 1000, spacing="trailing")
  ref = np.asarray(ddx.sample(m.eps, fine, x_T))
  Ss = [24, 48, 96]  # the asymptotic regime; at S = 12 the rates are not yet visible
  orders = {}
  for name, kw in [("ddim", dict(clip_sample=False)), ("plms", dict(set_alpha_to_one=True)), ("dpm_solver++", {})]:
    errs = [_ode_error(name, S, m, x_T, ref, **kw) for S in Ss]
    orders[name] = [np.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert errs[0] > errs[1] > errs[2], (name, errs)
  assert all(0.8 < p < 1.2 for p in orders["ddim"]), orders
  assert all(p > 1.5 for p in orders["plms"]), orders
  assert all(p > 1.5 for p in orders["dpm_solver++"]), orders


# --- identities between samplers ------------------------------------------------------------


def test_dpm_first_order_equals_ddim():
  m = Mixture(SCHED, [0.5, 0.5], [[0.8], [-0.6]], [0.25, 0.35])
  x_T = _noise((32, 1), 2)
  dpm = ddx.samplers.make("dpm_solver++", SCHED, 15, solver_order=1)
  ddim = ddx.samplers.make("ddim", SCHED, None, timesteps=np.asarray(dpm.timesteps), clip_sample=False)
  chex.assert_trees_all_close(ddx.sample(m.eps, dpm, x_T), ddx.sample(m.eps, ddim, x_T), atol=2e-5)


def test_constant_eps_collapses_plms_to_ddim():
  c = 0.37

  def const(x, t):
    return jnp.full_like(x, c)

  x_T = _noise((4, 3), 4)
  plms = ddx.samplers.make("plms", SCHED, 20, set_alpha_to_one=True)
  ddim = ddx.samplers.make("ddim", SCHED, 20, clip_sample=False)
  chex.assert_trees_all_close(ddx.sample(const, plms, x_T), ddx.sample(const, ddim, x_T), atol=2e-5)


def test_plms_is_pseudo_adams_bashforth_in_sbar():
  """docs/samplers.md §5: in xbar = x/sqrt(a), sbar = sqrt((1-a)/a) PLMS is Heun then AB2/3/4
  with uniform-step weights; reimplemented here in float64 from that description."""

  def e_of_t(t):  # x-independent "model" depending on the timestep only
    return np.sin(t / 137.0) + 0.3 * (t / 1000.0) ** 2

  def model(x, t):
    tf = t.astype(jnp.float32)[:, None]
    return jnp.broadcast_to(jnp.sin(tf / 137.0) + 0.3 * (tf / 1000.0) ** 2, x.shape)

  S = 12
  smp = ddx.samplers.make("plms", SCHED, S, set_alpha_to_one=True)
  x_T = _noise((3, 2), 8)
  out = np.asarray(ddx.sample(model, smp, x_T))
  ts = np.arange(S)[::-1] * (1000 // S)
  a = np.r_[AB[ts], 1.0]
  sb = np.sqrt((1 - a) / a)
  xb = np.asarray(x_T, np.float64) / np.sqrt(a[0])
  hist = []
  for k in range(S):
    e = e_of_t(ts[k])
    if k == 0:
      e_next = e_of_t(ts[1]) if S > 1 else e
      ep = (e + e_next) / 2
    elif len(hist) == 1:
      ep = (3 * e - hist[-1]) / 2
    elif len(hist) == 2:
      ep = (23 * e - 16 * hist[-1] + 5 * hist[-2]) / 12
    else:
      ep = (55 * e - 59 * hist[-1] + 37 * hist[-2] - 9 * hist[-3]) / 24
    hist.append(e)
    xb = xb + (sb[k + 1] - sb[k]) * ep
  np.testing.assert_allclose(out, xb * np.sqrt(a[-1]), atol=1e-4)


@pytest.mark.parametrize(
  "name,kw",
  [
    ("ddim", dict(clip_sample=False)),
    ("ddim", dict(clip_sample=False, eta=0.7)),
    ("ddpm", dict(clip_sample=False)),
    ("plms", dict()),
    ("dpm_solver++", dict()),
  ],
)
@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_prediction_types_interchangeable(name, kw, prediction):
  """Feeding x0* or v* with the matching prediction type reproduces the eps* run (oracle 11)."""
  m = Mixture(SCHED, [0.5, 0.5], [[0.6, 0.1], [-0.6, -0.3]], [0.3, 0.3])
  x_T = _noise((16, 2), 6)
  key = jax.random.key(5)
  S = 20
  a = ddx.sample(m.eps, ddx.samplers.make(name, SCHED, S, **kw), x_T, key)
  b = ddx.sample(m.fn(prediction), ddx.samplers.make(name, SCHED, S, prediction=prediction, **kw), x_T, key)
  chex.assert_trees_all_close(a, b, atol=2e-4)
