"""Alternative layer implementations equal the reference ``lax`` ones (value and gradient).

`ddx.models.layers.Conv` with ``impl="dots"`` (matrix products, float32 accumulation) against
``impl="lax"`` (``nnx.Conv``, XLA's convolution) on odd shapes, in float32 (to float32
round-off) and bfloat16 (both within bfloat16 rounding of the exact float32 result on the same
bfloat16-rounded inputs); the per-backend choice of ``"auto"``; and a whole U-Net with every
convolution forced to each implementation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddx.models import UNet, layers
from tests._tiny import numpy_init

# (batch, H, W, C_in, C_out, kernel, stride, padding)
CASES = [
  (2, 7, 5, 3, 4, 3, 1, ((1, 1), (1, 1))),  # non-square, "same" padding
  (1, 6, 9, 5, 6, 3, 2, ((0, 1), (0, 1))),  # batch 1, stride 2, TF "SAME" (bottom/right)
  (2, 8, 6, 4, 3, 3, 2, ((1, 1), (1, 1))),  # stride 2, symmetric padding
  (3, 5, 7, 6, 2, 1, 1, ((0, 0), (0, 0))),  # 1x1 (shortcut)
  (1, 5, 4, 2, 3, 3, 1, ((2, 0), (0, 2))),  # asymmetric padding
  (2, 6, 6, 3, 5, 3, 1, ((0, 0), (0, 0))),  # valid
  (2, 7, 7, 4, 4, 1, 2, ((0, 0), (0, 0))),  # 1x1, stride 2
]


def _conv(case, impl, dtype=None, seed=0):
  b, h, w, cin, cout, k, s, pad = case
  return layers.Conv(
    cin,
    cout,
    (k, k),
    strides=(s, s),
    padding=pad,
    dtype=dtype,
    impl=impl,
    bias_init=nnx.initializers.normal(1.0),
    rngs=nnx.Rngs(seed),
  )


def _inputs(case, seed=1):
  b, h, w, cin = case[:4]
  return jax.random.normal(jax.random.key(seed), (b, h, w, cin), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(graphdef, state, x, r):
  """Output, and the gradients of sum(output * r) w.r.t. x, kernel and bias."""

  def f(state, x):
    y = nnx.merge(graphdef, state)(x)
    return jnp.sum(y.astype(jnp.float32) * r), y

  (_, y), (gs, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(state, x)
  return y.astype(jnp.float32), gx, gs["kernel"][...], gs["bias"][...]


def _run(conv, x, r):
  graphdef, state = nnx.split(conv)
  return _value_and_grads(graphdef, state, x, r)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _case_id(c):
  return "x".join(map(str, c[:6])) + f"s{c[6]}p{c[7]}"


# a 3x3 and a 1x1 case also run in the quick tier
@pytest.mark.parametrize(
  "case",
  [pytest.param(c, id=_case_id(c), marks=() if i in (0, 3) else (pytest.mark.slow,)) for i, c in enumerate(CASES)],
)
def test_dots_equal_lax_float32(case):
  x = _inputs(case)
  ref_conv, dots_conv = _conv(case, "lax"), _conv(case, "dots")
  y_ref = ref_conv(x)
  r = jax.random.normal(jax.random.key(2), y_ref.shape)
  ref, got = _run(ref_conv, x, r), _run(dots_conv, x, r)
  assert got[0].shape == y_ref.shape
  for name, a, b in zip(("value", "d x", "d kernel", "d bias"), got, ref):
    assert a.dtype == b.dtype == jnp.float32
    assert _rel(a, b) < 2e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES[:3] + CASES[3:4], ids=lambda c: "x".join(map(str, c[:6])) + f"s{c[6]}")
def test_dots_equal_lax_bfloat16(case):
  # Exact answer: float32 convolution of the same bfloat16-rounded inputs and parameters.
  x = _inputs(case).astype(jnp.bfloat16).astype(jnp.float32)
  exact_conv = _conv(case, "lax")
  state = nnx.state(exact_conv)
  state = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), state)
  nnx.update(exact_conv, state)
  r = jax.random.normal(jax.random.key(2), exact_conv(x).shape).astype(jnp.bfloat16).astype(jnp.float32)
  exact = _run(exact_conv, x, r)
  errs = {}
  for impl in ("lax", "dots"):
    conv = _conv(case, impl, dtype=jnp.bfloat16)
    nnx.update(conv, state)
    got = _run(conv, x, r)
    assert got[0].dtype == jnp.float32
    errs[impl] = [_rel(a, b) for a, b in zip(got, exact)]
  names = ("value", "d x", "d kernel", "d bias")
  # dots: a few bfloat16 roundings (2**-8 relative each) of float32-accumulated products ...
  assert max(errs["dots"]) < 2e-2, dict(zip(names, errs["dots"]))
  # ... and never worse than the reference, which also accumulates d bias in bfloat16
  for name, d, l in zip(names, errs["dots"], errs["lax"]):
    assert d <= l + 1e-2, (name, d, l)


def test_auto_choice_per_backend():
  r = layers.resolve_conv_impl
  for backend in ("tpu", "gpu", "cuda", "rocm"):
    for dtype in (None, jnp.float32, jnp.bfloat16, "float16"):
      for k in (1, 3):
        assert r("auto", dtype, 512, k, backend=backend) == "lax"
  for dtype in (None, jnp.float32):  # float32 on CPU: 1x1 as a product, 3x3 on XLA's op
    assert r("auto", dtype, 512, 3, backend="cpu") == "lax"
    assert r("auto", dtype, 3, 3, backend="cpu") == "lax"
    assert r("auto", dtype, 512, 1, backend="cpu") == "dots"
    assert r("auto", dtype, 3, 1, backend="cpu") == "dots"
  assert r("auto", jnp.bfloat16, layers.DOTS_MIN_CHANNELS, 3, backend="cpu") == "dots"
  assert r("auto", "float16", layers.DOTS_MIN_CHANNELS, 3, backend="cpu") == "dots"
  assert r("auto", jnp.bfloat16, layers.DOTS_MIN_CHANNELS - 1, 3, backend="cpu") == "lax"
  assert r("auto", jnp.bfloat16, 3, 1, backend="cpu") == "dots"
  for impl in ("lax", "dots"):  # forced implementations ignore the backend
    for backend in ("cpu", "tpu"):
      assert r(impl, jnp.bfloat16, 3, 3, backend=backend) == impl
  with pytest.raises(ValueError, match="conv_impl"):
    r("fast", None, 8)
  with pytest.raises(ValueError, match="conv_impl"):
    layers.Conv(2, 2, (3, 3), impl="fast", rngs=nnx.Rngs(0))


def _all_primitives(closed):
  names = set()

  def walk(jaxpr):
    for e in jaxpr.eqns:
      names.add(e.primitive.name)
      for v in e.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          if hasattr(sub, "jaxpr"):
            walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(closed.jaxpr)
  return names


@pytest.mark.parametrize(
  "impl,dtype,channels,k,expect_conv",
  [
    ("lax", None, 8, 3, True),
    ("dots", None, 8, 3, False),
    ("lax", None, 8, 1, True),
    ("auto", None, 256, 3, True),  # float32 3x3 on CPU: XLA's convolution
    ("auto", None, 256, 1, False),  # 1x1 on CPU: a product, in every dtype
    ("auto", jnp.bfloat16, 8, 1, False),
    ("auto", jnp.bfloat16, 256, 3, False),  # bfloat16, >= 256 channels on CPU: dots
    ("auto", jnp.bfloat16, 8, 3, True),
  ],
)
def test_forced_implementation_on_cpu(impl, dtype, channels, k, expect_conv):
  assert jax.default_backend() == "cpu"
  conv = layers.Conv(channels, 4, (k, k), padding=((k // 2, k // 2),) * 2, dtype=dtype, impl=impl, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 4, 4, channels), jnp.float32)
  graphdef, state = nnx.split(conv)
  prims = _all_primitives(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
  assert ("conv_general_dilated" in prims) == expect_conv, prims


SMALL = dict(
  image_size=8,
  in_channels=3,
  base_channels=8,
  channel_mult=(1, 2),
  num_res_blocks=1,
  attention_resolutions=(4,),
  norm_num_groups=4,
  downsample_padding=0,
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_unet_dots_equal_lax(dtype):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t = jnp.array([3, 700])
  results = {}
  for impl in ("lax", "dots"):
    model = numpy_init(lambda impl=impl: UNet(**SMALL, dtype=dtype, conv_impl=impl, rngs=nnx.Rngs(0)), seed=5)
    graphdef, params = nnx.split(model)

    def loss(params, graphdef=graphdef):
      out = nnx.merge(graphdef, params)(x, t)
      return jnp.mean(jnp.square(out - x)), out

    if dtype is None:
      (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
      results[impl] = (out, np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))
    else:  # the bfloat16 gradients of every convolution: test_dots_equal_lax_bfloat16
      results[impl] = (jax.jit(lambda p, graphdef=graphdef: nnx.merge(graphdef, p)(x, t))(params), None)
  # float32: summation order only; bfloat16: both round activations to bfloat16 differently
  tol = (2e-5, 1e-4) if dtype is None else (5e-2, None)
  assert _rel(results["dots"][0], results["lax"][0]) < tol[0]
  if dtype is None:
    assert _rel(results["dots"][1], results["lax"][1]) < tol[1]


def test_auto_falls_back_to_lax_where_dots_do_not_apply():
  # a 1x1 conv resolves to "dots" on CPU, but string padding is not something the products
  # take: "auto" must run XLA's op rather than fail; a forced "dots" gives the one-line error
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 6))
  ref = nnx.Conv(6, 4, (1, 1), padding="SAME", rngs=nnx.Rngs(1))(x)
  got = layers.Conv(6, 4, (1, 1), padding="SAME", impl="auto", rngs=nnx.Rngs(1))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  with pytest.raises(ValueError, match="conv_impl: 'dots' needs a 2-D convolution with explicit padding"):
    layers.Conv(6, 4, (1, 1), padding="SAME", impl="dots", rngs=nnx.Rngs(1))(x)
