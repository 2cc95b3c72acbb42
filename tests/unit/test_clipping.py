"""Per-step x0 clipping must keep each update consistent (docs/samplers.md §2.6, §4).

The oracle is a two-component mixture whose components sit at ±0.9, near the clip range,
with the exact eps deliberately miscalibrated (scaled by 1.1) so that x0-hat overshoots
[-1, 1] early in sampling, as a small trained model's does.
"""

import chex
import jax
import numpy as np
import pytest

import ddx
from tests._closed_form import Mixture

SCHED = ddx.schedules.make("linear", 1000)
D = 4
WEIGHT_POS = 0.3
MIX = Mixture(SCHED, [WEIGHT_POS, 1 - WEIGHT_POS], [np.full(D, 0.9), np.full(D, -0.9)], [0.05, 0.05])


def _overshooting_eps(x, t):
  return 1.1 * MIX.eps(x, t)


X_T = jax.random.normal(jax.random.key(0), (4000, D))
STEPS = (50, 100, 200, 500)


def _stats(sampler, key=None):
  x = np.asarray(ddx.sample(_overshooting_eps, sampler, X_T, key))
  frac_pos = float((x.mean(1) > 0).mean())
  dist = float(np.nanmean(np.minimum(np.abs(x - 0.9), np.abs(x + 0.9))))
  return frac_pos, dist


def test_ddim_default_rederives_eps_whenever_x0_is_processed():
  mk = lambda **kw: ddx.samplers.make("ddim", SCHED, 10, **kw)
  assert mk().use_clipped_model_output  # clip_sample=True by default
  assert mk(thresholding=True, clip_sample=False).use_clipped_model_output
  assert not mk(clip_sample=False).use_clipped_model_output  # nothing to re-derive
  assert not mk(use_clipped_model_output=False).use_clipped_model_output  # diffusers' default, on request


def test_inconsistent_clipping_drifts_with_steps_and_the_default_does_not():
  """Measured (4000 samples; true component weight 0.3):
  clip + unclipped eps (diffusers): frequency 0.594, 0.470, 0.364, 0.335 at S = 50..500,
    mean distance to the nearest component ~0.1 (and some samples diverge at S = 500);
  ddx default (clip + re-derived eps): 0.270, 0.272, 0.273, 0.273, distance 0.013..0.021."""
  default = [_stats(ddx.samplers.make("ddim", SCHED, s, clip_sample=True)) for s in STEPS]
  freqs = [f for f, _ in default]
  assert max(freqs) - min(freqs) < 0.02, freqs
  assert all(abs(f - WEIGHT_POS) < 0.05 for f in freqs), freqs
  assert all(d < 0.03 for _, d in default), default

  diffusers = [
    _stats(ddx.samplers.make("ddim", SCHED, s, clip_sample=True, use_clipped_model_output=False)) for s in (50, 500)
  ]
  assert diffusers[0][0] - diffusers[1][0] > 0.15, diffusers  # the frequencies drift with S
  assert all(d > 0.08 for _, d in diffusers), diffusers  # and samples miss the components


def test_ddpm_posterior_mean_is_consistent_by_construction():
  """DDPM's mean is built from x0 alone; DDIM eta = 1 with the consistent eps is the same step
  (same grid, same injected noise), while diffusers' combination is not."""
  key = jax.random.key(3)
  ddpm = ddx.samplers.make("ddpm", SCHED, 50, variance="fixed_small", clip_sample=True)
  ref = ddx.sample(_overshooting_eps, ddpm, X_T, key)
  ddim = ddx.sample(_overshooting_eps, ddx.samplers.make("ddim", SCHED, 50, eta=1.0, clip_sample=True), X_T, key)
  chex.assert_trees_all_close(ddim, ref, atol=2e-4)
  bad = ddx.samplers.make("ddim", SCHED, 50, eta=1.0, clip_sample=True, use_clipped_model_output=False)
  assert float(np.abs(np.asarray(ddx.sample(_overshooting_eps, bad, X_T, key)) - np.asarray(ref)).max()) > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_dpm_solver_data_prediction_is_consistent_by_construction(spacing):
  """First-order DPM-Solver++ is written in x0 alone; with thresholding at max 1 (= clipping)
  it equals consistent DDIM eta = 0 on the same grid, and differs from diffusers' combination."""
  ts = ddx.samplers.grids.make(spacing, 1000, 25)
  dpm = ddx.samplers.make("dpm_solver++", SCHED, 25, timesteps=ts, solver_order=1, thresholding=True)
  ddim = ddx.samplers.make("ddim", SCHED, 25, timesteps=ts, clip_sample=True, set_alpha_to_one=True)
  ref = ddx.sample(_overshooting_eps, dpm, X_T)
  chex.assert_trees_all_close(ddx.sample(_overshooting_eps, ddim, X_T), ref, atol=2e-4)
  bad = ddx.samplers.make("ddim", SCHED, 25, timesteps=ts, clip_sample=True, use_clipped_model_output=False)
  assert float(np.abs(np.asarray(ddx.sample(_overshooting_eps, bad, X_T)) - np.asarray(ref)).max()) > 1e-2
  freqs = [_stats(ddx.samplers.make("dpm_solver++", SCHED, s, thresholding=True))[0] for s in (20, 200)]
  assert abs(freqs[0] - freqs[1]) < 0.01, freqs
