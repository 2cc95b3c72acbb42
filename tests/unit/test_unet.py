"""Tests of ddx.models.UNet (architecture, conditioning, dropout, remat, dtype, validation)."""

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddx.models import UNet, UNetConfig, abstract, param_count, param_shapes
from tests._tiny import numpy_init

CIFAR10 = dict(
  image_size=32,
  in_channels=3,
  base_channels=128,
  channel_mult=(1, 2, 2, 2),
  num_res_blocks=2,
  attention_resolutions=(16,),
  dropout=0.1,
  norm_num_groups=32,
  norm_eps=1e-6,
)
# Small enough to compile in about a second: 16x16, channels 16/32, attention at 8x8.
SMALL = dict(
  image_size=16,
  in_channels=3,
  base_channels=16,
  channel_mult=(1, 2),
  num_res_blocks=1,
  attention_resolutions=(8,),
  norm_num_groups=4,
  dropout=0.1,
)


def make(seed=0, **overrides):
  return numpy_init(lambda: UNet(**{**SMALL, **overrides}, rngs=nnx.Rngs(0)), seed=seed)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, t, y, key):
  return nnx.merge(graphdef, state)(x, t, y, dropout_key=key)


def jit_apply(model):
  """jit-compiled ``(x, t, y, key) -> model(x, t, y, dropout_key=key)`` (cached per graph)."""
  graphdef, state = nnx.split(model)
  return lambda x, t, y=None, key=None: _apply(graphdef, state, x, t, y, key)


def inputs(batch=2, size=16, channels=3, seed=0):
  kx, kt = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, size, size, channels))
  t = jax.random.randint(kt, (batch,), 0, 1000)
  return x, t


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def test_param_count_cifar10_matches_diffusers():
  # diffusers UNet2DModel for google/ddpm-cifar10-32 has 35,746,307 parameters.
  assert param_count(abstract(UNetConfig(**CIFAR10))) == 35_746_307
  # learn_sigma doubles conv_out only: +3 * (3*3*128 + 1).
  assert param_count(abstract(UNetConfig(**CIFAR10, learn_sigma=True))) == 35_746_307 + 3 * (9 * 128 + 1)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape_cifar10_abstract(learn_sigma):
  x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((4,), jnp.int32)
  out = nnx.eval_shape(
    lambda: UNet(**CIFAR10, learn_sigma=learn_sigma, rngs=nnx.Rngs(0))(jnp.zeros(x.shape), jnp.zeros(t.shape, t.dtype))
  )
  chex.assert_shape(out, (4, 32, 32, 6 if learn_sigma else 3))
  assert out.dtype == jnp.float32


@pytest.mark.parametrize("learn_sigma,out_channels", [(True, None), (False, 1)])
def test_output_shape_small(learn_sigma, out_channels):
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out = nnx.eval_shape(
    lambda: make(learn_sigma=learn_sigma, out_channels=out_channels)(jnp.zeros(x.shape), jnp.zeros(t.shape, t.dtype))
  )
  c = out_channels or 3
  chex.assert_shape(out, (2, 16, 16, 2 * c if learn_sigma else c))


@pytest.mark.slow
def test_forward_and_time_dependence():
  apply = jit_apply(make())
  x, _ = inputs()
  a = apply(x, jnp.array([0, 0]))
  chex.assert_shape(a, x.shape)
  chex.assert_tree_all_finite(a)
  b = apply(x, jnp.array([500, 500]))
  assert rel_err(a, b) > 1e-3
  # a scalar t broadcasts over the batch; float timesteps are accepted
  chex.assert_trees_all_close(apply(x, jnp.int32(500)), b, atol=1e-6)
  chex.assert_trees_all_close(apply(x, jnp.array([500.0, 0.0])), jnp.stack([b[0], a[1]]), atol=1e-5)


def test_config_json_roundtrip():
  config = UNetConfig(**SMALL, num_classes=5, dtype=jnp.bfloat16, remat=True)
  model = abstract(config)  # the network, shapes only: building it is what is checked
  kw = json.loads(json.dumps(model.config.to_json()))
  assert kw == config.to_json()
  assert UNetConfig.from_json(kw) == model.config and hash(UNetConfig.from_json(kw)) == hash(model.config)
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), param_shapes(model))
  clone = nnx.eval_shape(lambda: UNet(**kw, rngs=nnx.Rngs(0)))
  assert clone.config == model.config and jax.tree.map(lambda a: (a.shape, a.dtype), param_shapes(clone)) == shapes
  # a config, with fields replaced, builds the same network as the keyword form
  same = nnx.eval_shape(
    lambda: UNet(UNetConfig.from_json({**kw, "num_classes": None}), num_classes=5, rngs=nnx.Rngs(0))
  )
  assert same.config == model.config and jax.tree.map(lambda a: (a.shape, a.dtype), param_shapes(same)) == shapes


def test_config_normalises_and_is_static():
  c = UNetConfig(**{**SMALL, "channel_mult": [1, 2], "attention_resolutions": [8, 16, 8], "num_classes": 0})
  assert c.channel_mult == (1, 2) and c.attention_resolutions == (16, 8) and c.num_classes is None
  assert c.out_channels == 3 and c.dtype is None and c.param_dtype == "float32"
  assert c.to_json()["channel_mult"] == [1, 2]
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.image_size = 32
  # the config is part of the graph definition, not of the state: jit treats it as static
  graphdef, state = nnx.split(abstract(UNetConfig(**SMALL)))
  assert not any(isinstance(leaf, UNetConfig) for leaf in jax.tree.leaves(state))
  hash(graphdef)
  # missing keys take the defaults; image_size has none
  assert UNetConfig.from_json({"image_size": 16, "channel_mult": [1]}).base_channels == 128
  with pytest.raises(ValueError, match="^image_size: required UNetConfig field is missing$"):
    UNetConfig.from_json({"in_channels": 3})


@pytest.fixture(scope="module")
def cond_model():
  return make(num_classes=3)


@pytest.fixture(scope="module")
def cond_apply(cond_model):
  return jit_apply(cond_model)


@pytest.fixture(scope="module")
def dropout_apply():
  return jit_apply(make(dropout=0.3))


class TestClassConditioning:
  @pytest.fixture
  def model(self, cond_model):
    return cond_model

  def test_label_changes_output(self, cond_apply):
    x, t = inputs()
    apply = cond_apply
    out0 = apply(x, t, jnp.array([0, 0]))
    out1 = apply(x, t, jnp.array([1, 1]))
    assert rel_err(out0, out1) > 1e-3
    # the label of one example only affects that example
    mixed = apply(x, t, jnp.array([0, 1]))
    chex.assert_trees_all_close(mixed[0], out0[0], atol=1e-5)
    chex.assert_trees_all_close(mixed[1], out1[1], atol=1e-5)

  def test_null_label(self, model, cond_apply):
    x, t = inputs()
    assert model.class_embedding.embedding.shape == (4, 64)  # num_classes + 1 rows
    null = cond_apply(x, t, jnp.array([3, 3], jnp.int32))
    chex.assert_trees_all_close(cond_apply(x, t), null, atol=1e-6)  # y=None -> null label
    assert rel_err(null, cond_apply(x, t, jnp.array([2, 2], jnp.int32))) > 1e-3

  @pytest.mark.parametrize("y", [[0, 4], [-1, 0], [0, 100]])
  def test_out_of_range_rejected(self, model, y):
    x, t = inputs()
    with pytest.raises(ValueError, match=r"y: labels must be in \[0, 3\]"):
      model(x, t, jnp.array(y, jnp.int32))
    with pytest.raises(ValueError, match="y:"):
      model.check_labels(np.array(y))

  def test_bad_label_type_and_shape(self, model):
    x, t = inputs()
    with pytest.raises(ValueError, match="integers"):
      model(x, t, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
      model.check_labels(np.zeros((2, 1), np.int32))
    model.check_labels(np.array([0, 1, 2, 3]))  # valid, incl. the null label

  def test_labels_on_unconditional_model_rejected(self):
    x, t = inputs()
    with pytest.raises(ValueError, match="num_classes"):
      make()(x, t, jnp.array([0, 1]))


class TestDropout:
  @pytest.fixture
  def apply(self, dropout_apply):
    return dropout_apply

  def test_same_key_same_output(self, apply):
    x, t = inputs()
    k = jax.random.key(1)
    chex.assert_trees_all_equal(apply(x, t, key=k), apply(x, t, key=k))

  def test_different_keys_differ(self, apply):
    x, t = inputs()
    a = apply(x, t, key=jax.random.key(1))
    b = apply(x, t, key=jax.random.key(2))
    assert rel_err(a, b) > 1e-3

  def test_none_is_deterministic(self, apply):
    x, t = inputs()
    a = apply(x, t)
    chex.assert_trees_all_equal(a, apply(x, t))
    assert rel_err(apply(x, t, key=jax.random.key(1)), a) > 1e-3

  def test_no_hidden_rng_state(self):
    model = make(dropout=0.3)
    # all state is parameters: nothing that a call could consume or advance
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))


@pytest.mark.slow
def test_remat_same_outputs_and_grads():
  plain, remat = make(seed=3), make(seed=3, remat=True)  # dropout 0.1 is active
  chex.assert_trees_all_equal(nnx.state(plain, nnx.Param), nnx.state(remat, nnx.Param))
  x, t = inputs()
  key = jax.random.key(5)

  def loss_and_grad(model):
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def f(params):
      out = nnx.merge(graphdef, params)(x, t, dropout_key=key)
      return jnp.mean(out**2), out

    (loss, out), grads = jax.value_and_grad(f, has_aux=True)(params)
    return out, grads

  out_p, g_p = loss_and_grad(plain)
  out_r, g_r = loss_and_grad(remat)
  chex.assert_trees_all_close(out_r, out_p, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g_r, g_p, rtol=1e-4, atol=1e-7)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_p)) > 0


def test_bf16_close_to_fp32():
  # bf16 rounds weights and activations (2**-9 relative) at every conv / matmul input, with
  # float32 accumulation; on random-init models this compounds to ~1.0-1.5% (measured: small
  # config 1.1-1.5%, CIFAR-10 config 0.9%), so 2% is the bound.
  f32, bf16 = make(seed=4), make(seed=4, dtype="bfloat16")
  params = nnx.state(bf16, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # fp32 params
  x, t = inputs()
  ref, out = jit_apply(f32)(x, t), jit_apply(bf16)(x, t)
  assert out.dtype == jnp.float32
  err = rel_err(out, ref)
  assert 1e-4 < err < 2e-2, err


BAD_CONFIGS = [
  (dict(norm_num_groups=5), "norm_num_groups"),
  (dict(base_channels=24, norm_num_groups=16), "norm_num_groups"),
  (dict(attention_resolutions=(4,)), "attention_resolutions"),
  (dict(attention_resolutions=(16, 3)), "attention_resolutions"),
  (dict(image_size=18, channel_mult=(1, 2, 2)), "image_size"),
  (dict(image_size=20, channel_mult=(1, 2, 2, 2), attention_resolutions=()), "image_size"),
  (dict(num_classes=-1), "num_classes"),
  (dict(num_classes=2.5), "num_classes"),
  (dict(channel_mult=()), "channel_mult"),
  (dict(channel_mult=(1, 0)), "channel_mult"),
  (dict(num_res_blocks=0), "num_res_blocks"),
  (dict(dropout=1.0), "dropout"),
  (dict(head_dim=12), "head_dim"),
  (dict(num_heads=3), "num_heads"),
  (dict(dtype="int8"), "dtype"),
  (dict(downsample_padding=2), "downsample_padding"),
  (dict(in_channels=0), "in_channels"),
  (dict(norm_eps=0.0), "norm_eps"),
]


@pytest.mark.parametrize("overrides,name", BAD_CONFIGS)
def test_bad_config_raises_before_init(overrides, name):

  class NoRngs:  # any use of rngs (parameter init) would fail with AttributeError/TypeError
    pass

  with pytest.raises(ValueError, match=f"^{name}: ") as exc:
    UNet(**{**SMALL, **overrides}, rngs=NoRngs())
  assert "\n" not in str(exc.value)


def test_unknown_kwarg_rejected():
  with pytest.raises(ValueError, match="^channels_mult: "):
    UNetConfig.from_json({**SMALL, "channels_mult": (1, 2)})
  with pytest.raises(ValueError, match="^channels_mult: not a UNetConfig field$"):
    UNet(**SMALL, channels_mult=(1, 2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="^channels_mult: "):
    UNetConfig(**SMALL).replace(channels_mult=(1, 2))


def test_bad_input_shapes():
  model = make()
  x, t = inputs()
  with pytest.raises(ValueError, match="^x: "):
    model(x[..., :2], t)
  with pytest.raises(ValueError, match="^x: "):
    model(jnp.zeros((2, 15, 15, 3)), t)
  with pytest.raises(ValueError, match="^t: "):
    model(x, jnp.zeros((3,)))
