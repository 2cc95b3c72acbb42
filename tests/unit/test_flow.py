"""Flow matching (rectified flow): the σ draws, the loss against an exact velocity, the flow
samplers on Gaussian data whose flow is known in closed form, the config checks, and a tiny
``ddx train`` -> ``ddx sample`` run. The diffusers trajectories (FlowMatchEulerDiscreteScheduler,
FlowMatchHeunDiscreteScheduler) are in tests/oracle/test_conformance.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddx
from ddx import losses
from ddx.cli import config as config_lib
from tests import _tiny as tiny
from tests._tiny import ROOT, TRAIN_FLAGS

S = 0.6  # data std: x0 ~ N(0, S² I)


def test_flow_draw_distributions_and_keys():
  x0 = jnp.zeros((20000, 2))
  key = jax.random.key(3)
  u, eps = losses.flow_draw(x0, key)
  assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
  assert eps.shape == x0.shape and abs(float(eps.std()) - 1) < 0.02
  ln, _ = losses.flow_draw(x0, key, timesteps="logit_normal", mean=0.5, std=0.8)
  logit = np.log(np.asarray(ln) / (1 - np.asarray(ln)))
  assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
  # the shift maps each draw monotonically upward (more time at high noise), from the same key
  sh, _ = losses.flow_draw(x0, key, shift=3.0)
  np.testing.assert_allclose(np.asarray(sh), 3 * np.asarray(u) / (1 + 2 * np.asarray(u)), rtol=1e-6)
  again, _ = losses.flow_draw(x0, key)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(u))
  with pytest.raises(ValueError, match="^timesteps: unknown flow timestep"):
    losses.flow_draw(x0, key, timesteps="cosine")


def test_flow_loss_is_zero_for_the_exact_velocity():
  """Data at a single point c: the exact velocity is (x - c)/σ, and the loss vanishes."""
  c = jnp.full((4, 3, 3, 1), 0.7)
  sigma, eps = losses.flow_draw(c, jax.random.key(0))
  exact = lambda x, t: (x - c) / (t / 1000.0).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(np.asarray(losses.flow_loss(exact, c, sigma, eps, 1000)), 0.0, atol=1e-9)
  wrong = lambda x, t: jnp.zeros_like(x)
  np.testing.assert_allclose(
    np.asarray(losses.flow_loss(wrong, c, sigma, eps, 1000)),
    np.mean(np.asarray(eps - c) ** 2, axis=(1, 2, 3)),
    rtol=1e-6,
  )


def gaussian_velocity(x, t):
  """E[eps - x0 | x_σ] for x0 ~ N(0, S²), x_σ = (1 - σ) x0 + σ eps, σ = t / 1000."""
  s = (t.astype(jnp.float32) / 1000.0)[:, None]
  return x * (s - (1 - s) * S**2) / ((1 - s) ** 2 * S**2 + s**2)


@pytest.mark.parametrize("name,floor,bound", [("flow_euler", 0.9, 0.2), ("flow_heun", 1.8, 0.02)])
def test_flow_samplers_map_noise_to_gaussian_data(name, floor, bound):
  """The flow of Gaussian data is linear, x(σ) = eps sqrt((1-σ)² S² + σ²): the samplers end
  at S x_T, with errors falling at their order (shift 3, S = 8, 16, 32; measured Euler 0.52,
  0.26, 0.13)."""
  x_T = jax.random.normal(jax.random.key(1), (4, 32), jnp.float32)
  errs = []
  for steps in (8, 16, 32):
    smp = ddx.samplers.make(name, None, steps, shift=3.0)
    out = np.asarray(ddx.sample(gaussian_velocity, smp, x_T), np.float64)
    errs.append(np.max(np.abs(out - S * np.asarray(x_T, np.float64))))
  orders = np.log2(np.asarray(errs[:-1]) / np.asarray(errs[1:]))
  assert np.all(orders > floor) and errs[-1] < bound, (errs, orders)


def _config(**overrides):
  return tiny.config("digits_flow", **overrides)


@pytest.mark.parametrize(
  "overrides,msg",
  [
    (dict(diffusion__kind="rectified"), "diffusion.kind: must be one of"),
    (dict(sample__sampler="ddim"), "sample.sampler: a diffusion.kind='flow' model samples with one of"),
    (dict(eval__sampler="heun"), "eval.sampler: a diffusion.kind='flow' model samples with one of"),
    (dict(diffusion__kind="ddpm"), "sample.sampler: 'flow_euler' is for diffusion.kind 'flow' / 'edm' models"),
    (dict(diffusion__kind="edm"), "sample.sampler: a diffusion.kind='edm' model samples with one of"),
    (dict(diffusion__flow_shift=0.0), "diffusion.flow_shift: must be > 0"),
    (dict(diffusion__flow_logit_std=-1.0), "diffusion.flow_logit_std: must be > 0"),
    (dict(diffusion__flow_timesteps="cosine"), "diffusion.flow_timesteps: must be one of"),
  ],
)
def test_flow_config_errors(overrides, msg):
  with pytest.raises(ValueError) as e:
    config_lib.validate(_config(**overrides))
  assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_flow_model_trains_and_samples(tmp_path, ddx_cli):
  wd = str(tmp_path / "flow")
  flags = [f for f in TRAIN_FLAGS if not f.startswith("--config=")]
  code, out, err = ddx_cli(
    "train",
    f"--workdir={wd}",
    f"--config={ROOT}/configs/digits_flow.py",
    *flags,
    "--config.train.total_steps=30",
    "--config.train.checkpoint_every=30",
    "--config.optim.learning_rate=3e-3",
  )
  assert code == 0, err[-2000:]
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
  assert last < 0.8 * first, (first, last)  # the velocity loss falls (it starts near 2: |eps - x0|²)
  code, out, err = ddx_cli("sample", f"--workdir={wd}", "--sampler=flow_heun", "--steps=4", "--num=8")
  assert code == 0 and "wrote" in out, err[-2000:]
  (name,) = [n for n in os.listdir(os.path.join(wd, "samples")) if n.endswith("_flow_heun4.npz")]
  x = np.load(os.path.join(wd, "samples", name))["samples"]
  assert x.shape == (8, 8, 8, 1) and np.all(np.isfinite(x))
  code, _, err = ddx_cli("sample", f"--workdir={wd}", "--sampler=ddim", "--steps=4", "--num=8")
  assert code == 1 and err.strip().endswith("model samples with one of ('flow_euler', 'flow_heun'), got 'ddim'"), err


# --- EDM ------------------------------------------------------------------------------------


def test_edm_preconditioning_of_the_exact_network_is_the_exact_denoiser():
  """For Gaussian data N(0, σ_d²), the network whose target EDM defines is known; then D is
  the exact denoiser x σ_d² / (σ_d² + σ²) and the EDM loss is 0."""
  sd = 0.5
  sigma = jnp.asarray([0.01, 0.3, 2.0, 50.0])
  x0 = jax.random.normal(jax.random.key(0), (4, 8)) * sd
  n = jax.random.normal(jax.random.key(1), (4, 8))

  def net(x_in, c_noise):  # F*(c_in x) = (D* - c_skip x) / c_out, with x = x_in / c_in
    s = jnp.exp(4.0 * c_noise)[:, None]
    c_skip, c_out, c_in, _ = ddx.edm.coefficients(s, sd)
    x = x_in / c_in
    return (x * sd**2 / (sd**2 + s**2) - c_skip * x) / c_out

  D = ddx.edm.precondition(net, sd)
  x = x0 + sigma[:, None] * n
  np.testing.assert_allclose(np.asarray(D(x, sigma)), np.asarray(x * sd**2 / (sd**2 + sigma[:, None] ** 2)), rtol=1e-5)
  # EDM's loss of that network is its irreducible part only: the posterior variance term
  # (its minimum over F): compare with λ E|D* - x0|² computed directly
  got = np.asarray(losses.edm_loss(net, x0, sigma, n, sd))
  d_star = x * sd**2 / (sd**2 + sigma[:, None] ** 2)
  lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
  np.testing.assert_allclose(got, np.asarray(lam * jnp.mean((d_star - x0) ** 2, axis=1)), rtol=1e-4)


def test_edm_heun_is_algorithm_2():
  """edm_heun on EDM's grid with the exact Gaussian denoiser = Karras et al.'s Algorithm 2 in
  float64 (without churn), from x_T sqrt(σ_max² + 1)."""
  from tests.unit.test_sigma_samplers import S2, _algorithm2

  def model(x, t):  # the x0 prediction at σ = t
    return x * S2 / (S2 + t[:, None] ** 2)

  smp = ddx.samplers.make("edm_heun", None, 12)
  x_T = jax.random.normal(jax.random.key(4), (4, 64), jnp.float32)
  out = np.asarray(ddx.sample(model, smp, x_T), np.float64)
  grid = np.r_[ddx.samplers.sigmas.karras(0.002, 80.0, 12), 0.0]
  x = np.asarray(x_T, np.float64) * np.sqrt(80.0**2 + 1)
  ref = _algorithm2(grid, x, [np.zeros_like(x)] * 12, 0.0, 0.0, np.inf, 1.0, heun=True)
  assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 2e-5


@pytest.mark.slow
def test_edm_model_trains_and_samples(tmp_path, ddx_cli):
  wd = str(tmp_path / "edm")
  flags = [f for f in TRAIN_FLAGS if not f.startswith("--config=")]
  code, out, err = ddx_cli(
    "train",
    f"--workdir={wd}",
    f"--config={ROOT}/configs/digits_edm.py",
    *flags,
    "--config.train.total_steps=30",
    "--config.train.checkpoint_every=30",
    "--config.optim.learning_rate=3e-3",
  )
  assert code == 0, err[-2000:]
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert np.mean([r["loss"] for r in rows[-3:]]) < 0.8 * rows[0]["loss"], rows
  code, out, err = ddx_cli("sample", f"--workdir={wd}", "--sampler=edm_euler", "--steps=6", "--num=8")
  assert code == 0 and "wrote" in out, err[-2000:]
  (name,) = [n for n in os.listdir(os.path.join(wd, "samples")) if n.endswith("_edm_euler6.npz")]
  x = np.load(os.path.join(wd, "samples", name))["samples"]
  assert x.shape == (8, 8, 8, 1) and np.all(np.isfinite(x)) and x.std() > 0.05
