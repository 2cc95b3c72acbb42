"""Editing (ddx.edit) and the driver's editing arguments, against closed forms.

Gaussian data fitted to the digits (full covariance; tests/_closed_form.FullGaussian) has an
exact eps and a probability-flow map known per eigen-direction, so inversion, reconstruction
and inpainting are checked against exact answers rather than against another implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import ddx
from ddx import edit
from ddx.sampling import Plan
from tests._closed_form import FullGaussian

SCHED = ddx.schedules.make("linear", 1000)
AB = SCHED.f64.alphas_cumprod


def _digits_gaussian(side: int) -> FullGaussian:
  """N(mean, cov + 0.01 I) of the digits at side x side in [-1, 1] (the ridge keeps the
  always-blank border pixels from making the covariance singular)."""
  f = 8 // side
  x = load_digits().images.reshape(-1, side, f, side, f).mean((2, 4)).reshape(-1, side * side) / 8.0 - 1.0
  return FullGaussian(SCHED, x.mean(0), np.cov(x.T) + 0.01 * np.eye(side * side))


G64 = _digits_gaussian(8)
G16 = _digits_gaussian(4)


# --- driver -----------------------------------------------------------------------------------


def test_plan_of_all_calls_and_identity_hook_are_plain_sampling_bitwise():
  smp = ddx.samplers.make("ddpm", SCHED, 20, clip_sample=False)
  x_T = jax.random.normal(jax.random.key(0), (8, 16))
  key = jax.random.key(1)
  plain = np.asarray(ddx.sample(G16.eps, smp, x_T, key))
  planned = np.asarray(ddx.sample(G16.eps, smp, x_T, key, plan=Plan.calls_only(np.arange(20))))
  hooked = np.asarray(ddx.sample(G16.eps, smp, x_T, key, hook=lambda x, i, e: x))
  np.testing.assert_array_equal(planned, plain)
  np.testing.assert_array_equal(hooked, plain)


def test_start_is_the_sub_grid():
  smp = ddx.samplers.make("ddim", SCHED, 20, clip_sample=False)
  sub = ddx.samplers.make("ddim", SCHED, None, timesteps=np.asarray(smp.timesteps)[7:], clip_sample=False)
  x = jax.random.normal(jax.random.key(2), (8, 16))
  np.testing.assert_allclose(
    np.asarray(ddx.sample(G16.eps, smp, x, start=7)), np.asarray(ddx.sample(G16.eps, sub, x)), atol=1e-6
  )


def test_plan_with_undo_entries_matches_a_python_replay():
  smp = ddx.samplers.make("ddim", SCHED, 12, eta=1.0, clip_sample=False)
  plan = edit.repaint_plan(smp, jump_length=3, jump_n_sample=2)
  assert plan.up.any() and not plan.up.all()
  x_T = jax.random.normal(jax.random.key(3), (4, 16))
  key = jax.random.key(4)
  hook_key = jax.random.key(5)
  x0 = jnp.asarray(G16.sample(4, 1), jnp.float32)
  mask = (np.arange(16) < 8).astype(np.float32)
  hook = edit.known_hook(smp, x0, mask, hook_key)
  got, x0s = ddx.sample(G16.eps, smp, x_T, key, hook=hook, plan=plan, return_x0_at=(11,))
  state = smp.init(x_T)
  for e, (i, up, cx, cz) in enumerate(zip(plan.calls, plan.up, plan.coef_x, plan.coef_z)):
    z = jax.random.normal(jax.random.fold_in(key, e), x_T.shape)
    if up:
      state = state._replace(x=cx * state.x + cz * z)
    else:
      state = smp.step(state, G16.eps(state.x, jnp.full((4,), smp.timesteps[i])), i, z)
      state = state._replace(x=hook(state.x, jnp.int32(i), jnp.int32(e)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(state.x), atol=1e-5)
  np.testing.assert_allclose(np.asarray(x0s[0]), np.asarray(state.x0), atol=1e-5)
  # the undo coefficients are the exact forward transition a' -> a (float64 schedule)
  ts = np.asarray(smp.timesteps)
  i = plan.calls[plan.up]
  a = AB[ts[i]]
  a_next = np.where(i + 1 < len(ts), AB[ts[np.minimum(i + 1, len(ts) - 1)]], 1.0)
  np.testing.assert_allclose(plan.coef_x[plan.up] ** 2, a / a_next, rtol=1e-6)
  np.testing.assert_allclose(plan.coef_z[plan.up] ** 2, 1 - a / a_next, rtol=1e-5)


def test_progress_reports_every_entry_without_recompiling():
  smp = ddx.samplers.make("ddim", SCHED, 15, clip_sample=False)
  seen, traces = [], []

  def model(x, t):
    traces.append(1)
    return G16.eps(x, t)

  def progress(done, total):
    seen.append((done, total))

  x_T = jnp.ones((2, 16))
  ddx.sample(model, smp, x_T, progress=progress)
  jax.effects_barrier()
  assert seen == [(k, 15) for k in range(1, 16)]
  traces.clear()
  ddx.sample(model, smp, x_T + 1, progress=progress)
  jax.effects_barrier()
  assert not traces and len(seen) == 30


# --- inversion and reconstruction on Gaussian data (exact probability-flow map) ----------------


def test_inversion_reconstruction_and_identity_converge_to_the_exact_flow():
  x0 = jnp.asarray(G64.sample(64, 0), jnp.float32)
  z = jax.random.normal(jax.random.key(7), x0.shape)
  inv_err, rec_err, id_err = [], [], []
  for S in (50, 200, 1000):
    smp = ddx.samplers.make("ddim", SCHED, S, clip_sample=False)
    x_T = edit.invert(G64.eps, smp, x0)
    exact = G64.flow(x0, 1.0, AB[int(smp.timesteps[0])])  # final alpha 1 -> the first grid level
    inv_err.append(np.abs(np.asarray(x_T) - exact).max() / np.abs(exact).max())
    rec_err.append(float(jnp.mean((edit.reconstruct(G64.eps, smp, x0) - x0) ** 2)))
    id_err.append(float(jnp.max(jnp.abs(edit.invert(G64.eps, smp, ddx.sample(G64.eps, smp, z)) - z))))
  # measured: inversion 0.23, 0.056, 0.008; reconstruction MSE 1.6e-3, 1.2e-4, 5e-6; identity 1.4, 0.4, 0.08
  assert inv_err[0] > inv_err[1] > inv_err[2] and inv_err[2] < 0.02, inv_err
  assert rec_err[0] > 5 * rec_err[1] > 25 * rec_err[2] and rec_err[2] < 2e-5, rec_err
  assert id_err[0] > id_err[1] > id_err[2] and id_err[2] < 0.15, id_err


def test_inversion_step_is_ddim_run_upwards_with_eps_at_the_target():
  """One call by hand: from the final level (1) to the last grid point t with eps(x0, t)."""
  smp = ddx.samplers.make("ddim", SCHED, 10, clip_sample=False, set_alpha_to_one=False)
  x0 = jnp.asarray(G16.sample(4, 3), jnp.float32)
  lat = edit.invert(G16.eps, smp, x0, return_all=True)[1]
  ts = np.asarray(smp.timesteps)
  a_cur, a_next = AB[0], AB[ts[-1]]  # set_alpha_to_one=False: the first level is ab[0]
  eps = np.asarray(G16.eps(x0, jnp.full((4,), ts[-1])), np.float64)
  x0_hat = (np.asarray(x0, np.float64) - np.sqrt(1 - a_cur) * eps) / np.sqrt(a_cur)
  np.testing.assert_allclose(np.asarray(lat[0]), np.sqrt(a_next) * x0_hat + np.sqrt(1 - a_next) * eps, atol=2e-6)
  assert lat.shape == (10, 4, 16)


# --- interpolation -----------------------------------------------------------------------------


def test_slerp():
  a = jax.random.normal(jax.random.key(8), (3, 4, 4, 1))
  b = jax.random.normal(jax.random.key(9), (3, 4, 4, 1))
  np.testing.assert_allclose(edit.slerp(a, b, 0.0), a, atol=1e-6)
  np.testing.assert_allclose(edit.slerp(a, b, 1.0), b, atol=1e-5)
  e1, e2 = jnp.eye(4)[None, 0], jnp.eye(4)[None, 1]
  np.testing.assert_allclose(edit.slerp(e1, e2, 0.5), (e1 + e2) / np.sqrt(2), atol=1e-6)
  np.testing.assert_allclose(edit.slerp(e1, e2, 1 / 3), [[np.cos(np.pi / 6), np.sin(np.pi / 6), 0, 0]], atol=1e-6)
  np.testing.assert_allclose(edit.slerp(e1, 2 * e1, 0.25), 1.25 * e1, atol=1e-6)  # parallel: linear
  grid = edit.interpolation_grid(a, b, 5)
  assert grid.shape == (15, 4, 4, 1)
  np.testing.assert_allclose(grid[5], a[1], atol=1e-6)
  np.testing.assert_allclose(grid[9], b[1], atol=1e-5)


# --- SDEdit --------------------------------------------------------------------------------------


def test_sdedit_strength_one_is_plain_sampling_and_tiny_strength_returns_the_input():
  smp = ddx.samplers.make("ddpm", SCHED, 20, clip_sample=False)
  x0 = jnp.asarray(G16.sample(8, 4), jnp.float32)
  key = jax.random.key(10)
  got = edit.sdedit(G16.eps, smp, x0, 1.0, key)
  noise = jax.random.normal(jax.random.fold_in(key, 0), x0.shape)
  x_T = ddx.diffusion.q_sample(SCHED, x0, jnp.full((8,), smp.timesteps[0]), noise)
  want = ddx.sample(G16.eps, smp, x_T, jax.random.fold_in(key, 1))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert float(jnp.max(jnp.abs(got - x0))) > 0.5  # really resampled
  np.testing.assert_array_equal(np.asarray(edit.sdedit(G16.eps, smp, x0, 0.049, key)), np.asarray(x0))
  one = edit.sdedit(G16.eps, smp, x0, 0.05, key)  # one call, at t = 0: almost the input
  assert 0 < float(jnp.max(jnp.abs(one - x0))) < 0.05
  assert [edit.sdedit_start(20, s) for s in (1.0, 0.5, 0.05, 0.049, 0.999)] == [0, 10, 19, 20, 1]


# --- inpainting on Gaussian data: the exact conditional ------------------------------------------


def _gaussian_fit(x, mean, cov):
  """(Mahalanobis norm of the mean error, KL(exact || fitted Gaussian)) of the samples x."""
  m, c = x.mean(0), np.cov(x.T)
  d = m - mean
  maha = float(np.linalg.norm(np.linalg.solve(np.linalg.cholesky(cov), d)))
  ci = np.linalg.inv(c)
  kl = 0.5 * (np.trace(ci @ cov) + d @ ci @ d - len(d) + np.linalg.slogdet(c)[1] - np.linalg.slogdet(cov)[1])
  return maha, float(kl)


def test_inpainting_approaches_the_exact_conditional_and_repaint_beats_replacement():
  keep = (np.arange(16) < 8).astype(np.float32)  # top two rows of the 4x4 digit known
  xk = G16.sample(1, 5)[0]
  cmean, ccov = G16.conditional(keep, xk[:8])
  n = 2000
  x0 = jnp.broadcast_to(jnp.asarray(xk, jnp.float32), (n, 16))
  smp = ddx.samplers.make("ddpm", SCHED, 100, clip_sample=False)
  key = jax.random.key(11)
  rep = np.asarray(edit.inpaint(G16.eps, smp, x0, keep, key), np.float64)
  rp = np.asarray(edit.repaint(G16.eps, smp, x0, keep, key, jump_length=5, jump_n_sample=10), np.float64)
  np.testing.assert_array_equal(rep[:, :8], np.broadcast_to(xk[:8].astype(np.float32), (n, 8)))
  np.testing.assert_array_equal(rp[:, :8], rep[:, :8])
  rep_m, rep_kl = _gaussian_fit(rep[:, 8:], cmean, ccov)
  rp_m, rp_kl = _gaussian_fit(rp[:, 8:], cmean, ccov)
  # measured: replacement 0.72 / 0.41, RePaint 0.20 / 0.27 (mean error / KL); sampling floor ~0.07
  assert rp_m < 0.35 and rep_m > 2 * rp_m, (rep_m, rp_m)
  assert rp_kl < rep_kl and rp_kl < 0.4, (rep_kl, rp_kl)
  for x in (rep, rp):  # the spread of the filled pixels is the conditional's, within 25%
    assert 0.75 < np.trace(np.cov(x[:, 8:].T)) / np.trace(ccov) < 1.25


# --- bad input: one line naming the argument ---------------------------------------------------------


def test_bad_edit_inputs():
  ddim = ddx.samplers.make("ddim", SCHED, 10, clip_sample=False)
  x0 = jnp.zeros((2, 16))
  key = jax.random.key(0)
  cases = [
    (lambda: edit.sdedit(G16.eps, ddim, x0, 0.0, key), "strength"),
    (lambda: edit.sdedit(G16.eps, ddim, x0, 1.5, key), "strength"),
    (lambda: edit.sdedit(G16.eps, ddim, x0, float("nan"), key), "strength"),
    (lambda: edit.sdedit(G16.eps, ddx.samplers.make("plms", SCHED, 10), x0, 0.5, key), "sampler"),
    (lambda: edit.inpaint(G16.eps, ddim, x0, np.ones(15), key), "mask"),
    (lambda: edit.inpaint(G16.eps, ddim, x0, np.full(16, 0.5), key), "mask"),
    (lambda: edit.repaint(G16.eps, ddim, x0, np.ones(16), key, jump_length=0), "jump_length"),
    (lambda: edit.repaint(G16.eps, ddim, x0, np.ones(16), key, jump_n_sample=1.5), "jump_n_sample"),
    (lambda: edit.invert(G16.eps, ddx.samplers.make("ddim", SCHED, 10, eta=1.0), x0), "sampler"),
    (lambda: edit.invert(G16.eps, ddx.samplers.make("ddpm", SCHED, 10), x0), "sampler"),
    (lambda: edit.reconstruct(G16.eps, ddx.samplers.make("ddim", SCHED, 10), x0), "sampler"),
    (lambda: edit.invert(G16.eps, ddim, jnp.zeros((2, 16), jnp.int32)), "x0"),
    (lambda: edit.slerp(x0, jnp.zeros((2, 15)), 0.5), "x_b"),
    (lambda: edit.interpolation_grid(x0, x0, 1), "num"),
    (lambda: ddx.sample(G16.eps, ddim, x0, start=10), "start"),
    (lambda: ddx.sample(G16.eps, ddx.samplers.make("dpm_solver++", SCHED, 10), x0, start=2), "sampler"),
    (lambda: ddx.sample(G16.eps, ddim, x0, plan=Plan.calls_only([0, 10])), "plan"),
    (lambda: ddx.sample(G16.eps, ddim, x0, hook=lambda x, i, e: x[:, :3]), "hook"),
    (lambda: ddx.sample(G16.eps, ddim, x0, start=3, return_x0_at=(1,)), "return_x0_at"),
  ]
  for fn, name in cases:
    with pytest.raises(ValueError, match=f"^{name}:") as info:
      fn()
    assert "\n" not in str(info.value), str(info.value)
