"""The lax.scan driver: one trace whatever the number of steps, sharding invariance, x0 taps,
and clear errors for bad input before anything is traced."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ddx
from tests._closed_form import Mixture

SCHED = ddx.schedules.make("linear", 1000)


def _mixture():
  return Mixture(SCHED, [0.5, 0.5], [[0.6, 0.1, 0.0, 0.2], [-0.6, -0.3, 0.1, 0.0]], [0.3, 0.3])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "plms", "dpm_solver++"])
def test_model_traced_once_whatever_the_steps(name):
  traces = []
  m = _mixture()

  def model(x, t):
    traces.append(1)
    return m.eps(x, t)

  x_T = jax.random.normal(jax.random.key(0), (4, 4))
  for S in (10, 999):
    traces.clear()
    smp = ddx.samplers.make(name, SCHED, S)
    ddx.sample(model, smp, x_T, jax.random.key(1))
    # one trace of the scan body, plus the abstract shape check the first time only
    assert len(traces) == (2 if S == 10 else 1), (S, len(traces))
    # same structure, new tables: no retrace at all
    traces.clear()
    ddx.sample(model, ddx.samplers.make(name, SCHED, S), x_T + 1, jax.random.key(2))
    assert len(traces) == 0, len(traces)  # cached: neither the shape check nor the loop retraces


def test_program_size_independent_of_steps():
  m = _mixture()
  x_T = jnp.zeros((4, 4))
  sizes = []
  for S in (10, 1000):
    smp = ddx.samplers.make("plms", SCHED, S)
    arrays, static = ddx.sampling._partition(smp)
    margs, mstatic = ddx.sampling._partition(m.eps)
    lowered = ddx.sampling._run.lower(
      margs,
      arrays,
      x_T,
      None,
      jnp.zeros((smp.num_calls,), jnp.int32),
      model_static=mstatic,
      sampler_static=static,
      num_x0=0,
    )
    sizes.append(len(lowered.as_text()))
  assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[0], sizes


@pytest.mark.parametrize("name,kw", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpm_solver++", {})])
def test_sharded_over_8_devices_matches_single_device(name, kw):
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
  m = _mixture()
  smp = ddx.samplers.make(name, SCHED, 25, **kw)
  x_T = jax.random.normal(jax.random.key(3), (16, 4))
  key = jax.random.key(4)
  single = ddx.sample(m.eps, smp, jax.device_put(x_T, jax.devices()[0]), key)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded_in = jax.device_put(x_T, NamedSharding(mesh, P("data")))
  sharded = ddx.sample(m.eps, smp, sharded_in, key)
  assert len(sharded.sharding.device_set) == 8
  chex.assert_trees_all_close(np.asarray(sharded), np.asarray(single), atol=1e-6)


def test_return_x0_at():
  m = _mixture()
  smp = ddx.samplers.make("ddim", SCHED, 20, clip_sample=False)
  x_T = jax.random.normal(jax.random.key(5), (8, 4))
  x, x0s = ddx.sample(m.eps, smp, x_T, return_x0_at=(0, 7, 19))
  assert x0s.shape == (3, 8, 4)
  chex.assert_trees_all_close(x, ddx.sample(m.eps, smp, x_T))
  # replay the loop in python with the pure step and compare the taps
  state = smp.init(x_T)
  taps = {}
  for i in range(smp.num_calls):
    t = jnp.full((8,), smp.timesteps[i])
    state = smp.step(state, m.eps(state.x, t), i, None)
    taps[i] = state.x0
  for j, i in enumerate((0, 7, 19)):
    chex.assert_trees_all_close(x0s[j], taps[i], atol=1e-4)  # jit fusion vs op-by-op rounding
  # with final alpha 1, the last x0 prediction is the sample
  chex.assert_trees_all_close(x0s[2], x, atol=1e-6)


def test_nnx_module_and_partial_are_traced_arguments():
  from flax import nnx

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x, t):
      return self.lin(x) * (t[:, None] / 1000.0)

  model = Tiny(nnx.Rngs(params=0))
  smp = ddx.samplers.make("ddim", SCHED, 5, clip_sample=False)
  x_T = jnp.ones((2, 4))
  a = ddx.sample(model, smp, x_T)
  # change the weights in place: the result must change (they are arguments, not constants)
  model.lin.kernel[...] = model.lin.kernel[...] * 2.0
  b = ddx.sample(model, smp, x_T)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  fn = jax.tree_util.Partial(lambda w, x, t: x * w, jnp.float32(0.1))
  ddx.sample(fn, smp, x_T)


# --- bad input: a ValueError naming the argument, raised before tracing -------------------------


@pytest.mark.parametrize(
  "args,kwargs,field",
  [
    (("k_euler", SCHED, 10), {}, "name"),
    (("ddim", SCHED, 0), {}, "num_steps"),
    (("ddim", SCHED, 1001), {}, "num_steps"),
    (("ddim", SCHED, 10), {"eta": -0.1}, "eta"),
    (("ddim", SCHED, 10), {"eta": float("nan")}, "eta"),
    (("plms", SCHED, 10), {"eta": 0.5}, "eta"),
    (("dpm_solver++", SCHED, 10), {"eta": 1.0}, "eta"),
    (("ddpm", SCHED, 10), {"eta": 1.0}, "eta"),
    (("ddim", SCHED, 10), {"spacing": "uniform"}, "spacing"),
    (("ddim", SCHED, 10), {"prediction": "epsilon"}, "prediction"),
    (("ddpm", SCHED, 10), {"variance": "learned"}, "variance"),
    (("ddim", SCHED, 1000), {"steps_offset": 1}, "timesteps"),  # index T (diffusers#10003)
    (("ddim", SCHED, 3), {"spacing": "compvis_uniform"}, "num_steps"),  # CompVis index T
    (("ddim", SCHED, 10), {"timesteps": [5, 9, 1]}, "timesteps"),
    (("ddim", SCHED, 10), {"timesteps": [1000, 5]}, "timesteps"),
    (("dpm_solver++", SCHED, 10), {"solver_order": 4}, "solver_order"),
    (("dpm_solver++", SCHED, 10), {"final_sigma": "none"}, "final_sigma"),
    (("ddim", SCHED, 10), {"threshold_ratio": 1.5}, "threshold_ratio"),
    (("ddim", SCHED, 10), {"spacing": "trailing", "steps_offset": 1}, "steps_offset"),
    (("ddim", SCHED), {}, "num_steps"),
  ],
)
def test_bad_sampler_args(args, kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}"):
    ddx.samplers.make(*args, **kwargs)


def test_eps_with_zero_terminal_snr_rejected():
  z = ddx.schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012, rescale_zero_snr=True)
  with pytest.raises(ValueError, match="^prediction"):
    ddx.samplers.make("ddim", z, 10, spacing="trailing")
  for name in ("ddim", "plms", "dpm_solver++", "ddpm"):
    with pytest.raises(ValueError, match="^prediction"):
      ddx.samplers.make(name, z, 10, spacing="trailing")
    ddx.samplers.make(name, z, 10, spacing="trailing", prediction="v")  # fine
  ddx.samplers.make("ddim", z, 10, spacing="leading")  # leading never reaches T-1


def test_bad_sample_inputs():
  m = _mixture()
  smp = ddx.samplers.make("ddim", SCHED, 5, clip_sample=False)
  with pytest.raises(ValueError, match="^model_fn"):
    ddx.sample(lambda x, t: x[:, :2], smp, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="^model_fn"):
    ddx.sample(lambda x, t: x @ jnp.ones((3, 3)), smp, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="^x_T"):
    ddx.sample(m.eps, smp, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="^x_T"):
    ddx.sample(m.eps, smp, jnp.zeros(()))
  with pytest.raises(ValueError, match="^key"):
    ddx.sample(m.eps, ddx.samplers.make("ddpm", SCHED, 5), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="^key"):
    ddx.sample(m.eps, ddx.samplers.make("ddpm", SCHED, 5), jnp.zeros((2, 4)), 0)
  with pytest.raises(ValueError, match="^return_x0_at"):
    ddx.sample(m.eps, smp, jnp.zeros((2, 4)), return_x0_at=(5,))
  with pytest.raises(ValueError, match="^sampler"):
    ddx.sample(m.eps, "ddim", jnp.zeros((2, 4)))
  learned = ddx.samplers.make("ddpm", SCHED, 5, variance="learned_range")
  with pytest.raises(ValueError, match="^model_output"):
    ddx.sample(m.eps, learned, jnp.zeros((2, 4)), jax.random.key(0))
