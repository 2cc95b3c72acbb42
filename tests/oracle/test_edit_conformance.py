"""ddx.edit against diffusers as the oracle (docs/samplers.md §8): DDIMInverseScheduler steps,
RePaintScheduler's schedule and steps (with the noise ddx draws injected), img2img timesteps.

Where the conventions agree: DDIM inversion with eps-prediction, no clipping, ``leading``
spacing (diffusers' inverse step takes its current level at ``t - T//S``); RePaint with
``T // S = 1`` (diffusers' ``undo_step`` for ``T // S > 1`` takes betas ``t .. t + T//S - 1``,
one grid step too high; ddx moves one grid step exactly, docs/samplers.md §8.4).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_repaint  # noqa: E402

import ddx  # noqa: E402
from ddx import edit  # noqa: E402
from ddx.sampling import Plan  # noqa: E402
from tests import _oracle_models as om  # noqa: E402

pytestmark = pytest.mark.torch


def _x0(seed=5):
  return jnp.tanh(jax.random.normal(jax.random.key(seed), om.SHAPE))


@pytest.mark.parametrize(
  "schedule,S,set_alpha_to_one,steps_offset",
  [
    ("linear", 10, True, 0),
    ("linear", 50, False, 0),
    ("scaled_linear", 25, True, 1),
    ("cosine", 20, False, 1),
  ],
)
def test_ddim_inverse_scheduler_trajectory(schedule, S, set_alpha_to_one, steps_offset):
  sch = diffusers.DDIMInverseScheduler(
    **om.diffusers_sched_kwargs(schedule),
    clip_sample=False,
    set_alpha_to_one=set_alpha_to_one,
    steps_offset=steps_offset,
  )
  sch.set_timesteps(S)
  x0 = _x0()
  ref, x = [], om.to_torch(x0)
  for t in sch.timesteps:
    x = sch.step(om.torch_model(x, t), t, x).prev_sample
    ref.append(om.from_torch(x))
  smp = ddx.samplers.make(
    "ddim",
    om.ddx_schedule(schedule),
    S,
    clip_sample=False,
    set_alpha_to_one=set_alpha_to_one,
    steps_offset=steps_offset,
  )
  np.testing.assert_array_equal(np.asarray(edit.inverse_sampler(smp).timesteps), sch.timesteps.numpy())
  x_T, lat = edit.invert(om.jax_model, smp, x0, return_all=True)
  assert len(ref) == S == lat.shape[0]
  for k in range(S):
    assert om.rel_err(lat[k], ref[k]) < 1e-5, (k, om.rel_err(lat[k], ref[k]))
  assert om.rel_err(x_T, ref[-1]) < 1e-5


def _repaint_timesteps(plan: Plan, ts: np.ndarray, r: int) -> list:
  """A ddx plan in diffusers' RePaint labelling: a model call at t is t; the undo of the call
  at t is labelled with the level above, t + T//S."""
  return [int(ts[i]) + (r if u else 0) for i, u in zip(plan.calls, plan.up)]


@pytest.mark.parametrize(
  "S,jump_length,jump_n_sample", [(250, 10, 10), (50, 5, 3), (20, 3, 2), (40, 1, 4), (12, 12, 5)]
)
def test_repaint_schedule(S, jump_length, jump_n_sample):
  sch = diffusers.RePaintScheduler()
  sch.set_timesteps(S, jump_length=jump_length, jump_n_sample=jump_n_sample)
  smp = ddx.samplers.make("ddim", ddx.schedules.make("linear", 1000), S)
  plan = edit.repaint_plan(smp, jump_length, jump_n_sample)
  assert _repaint_timesteps(plan, np.asarray(smp.timesteps), 1000 // S) == sch.timesteps.tolist()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_repaint_steps_with_injected_noise(eta):
  T = S = 40
  sch = diffusers.RePaintScheduler(num_train_timesteps=T, eta=eta, clip_sample=True)
  sch.set_timesteps(S, jump_length=4, jump_n_sample=3)
  smp = ddx.samplers.make(
    "ddim", ddx.schedules.make("linear", T), S, eta=eta, clip_sample=True, use_clipped_model_output=False
  )
  plan = edit.repaint_plan(smp, 4, 3)
  x0 = _x0()
  mask = np.broadcast_to((np.arange(64).reshape(8, 8, 1) % 7 < 3).astype(np.float32), om.SHAPE[1:])
  x_T = om.x_T(3)
  key, hook_key = jax.random.key(6), jax.random.key(7)
  ours = ddx.sample(om.jax_model, smp, x_T, key, hook=edit.known_hook(smp, x0, mask, hook_key), plan=plan)

  ts = np.asarray(smp.timesteps)
  m = om.to_torch(mask[None])
  queue = []

  def fake(shape, generator=None, device=None, dtype=None, layout=None):
    z = queue.pop(0)
    assert tuple(z.shape) == tuple(shape)
    return z.to(dtype=dtype)

  orig = scheduling_repaint.randn_tensor
  scheduling_repaint.randn_tensor = fake
  try:
    x, xo = om.to_torch(x_T), om.to_torch(x0)
    for e, (i, up) in enumerate(zip(plan.calls, plan.up)):
      run = om.to_torch(om.ddx_noise(key, e))
      if up:
        queue.append(run)
        x = sch.undo_step(x, int(ts[i]))
      else:
        # diffusers draws one noise per step for both regions: the known pixels' part is ddx's hook noise
        queue.append(m * om.to_torch(om.ddx_noise(hook_key, e)) + (1 - m) * run)
        x = sch.step(om.torch_model(x, int(ts[i])), int(ts[i]), x, xo, m).prev_sample
      assert not queue
  finally:
    scheduling_repaint.randn_tensor = orig
  assert _repaint_timesteps(plan, ts, 1) == sch.timesteps.tolist()
  assert om.rel_err(ours, om.from_torch(x)) < 1e-5, om.rel_err(ours, om.from_torch(x))


@pytest.mark.parametrize("S", [10, 25, 50])
def test_img2img_timesteps(S):
  from diffusers import StableDiffusionImg2ImgPipeline

  sch = diffusers.DDIMScheduler(**om.diffusers_sched_kwargs("scaled_linear"), steps_offset=1)
  sch.set_timesteps(S)
  smp = ddx.samplers.make("ddim", om.ddx_schedule("scaled_linear"), S, steps_offset=1)
  np.testing.assert_array_equal(np.asarray(smp.timesteps), sch.timesteps.numpy())
  for strength in (0.01, 1.0 / S, 0.1, 0.3, 0.5, 0.75, 0.8, 0.999, 1.0):
    sch.set_timesteps(S)
    ref, n = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sch), S, strength, "cpu")
    start = edit.sdedit_start(S, strength)
    assert np.asarray(smp.timesteps)[start:].tolist() == ref.tolist(), strength
    assert S - start == n
