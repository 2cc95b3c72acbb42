"""benchmarks/profile_ops.py's reading of compiled HLO: every convolution of a gradient is
found, weight gradients are told apart, and FLOPs come out as 2 x N x H x W x C x O x k²
(the trace itself needs xprof and is not run here)."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
  spec = importlib.util.spec_from_file_location("profile_ops", os.path.join(ROOT, "benchmarks", "profile_ops.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_hlo_ops_are_classified_with_their_flops():
  mod = _script()
  n, h, w, c, o = 2, 8, 6, 5, 7

  def loss(x, k, m):
    y = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.dot(y.reshape(-1, o), m))

  args = (jnp.ones((n, h, w, c)), jnp.ones((3, 3, c, o)), jnp.ones((o, 4)))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  text = compiled.as_text()
  comps, insts = mod._computations(text)
  entry = re.search(r"ENTRY %([\w.\-]+)", text).group(1)  # the ops a trace shows
  found = [mod.describe(name, comps, insts) for name, (comp, _) in insts.items() if comp == entry]
  convs = [(cat, flops) for cat, flops, _ in found if cat.startswith("convolution")]
  conv_flops = 2.0 * n * h * w * c * o * 9
  # the forward (d loss / d m needs y), the input gradient and the weight gradient
  assert sorted(cat.split(" (")[0] for cat, _ in convs) == [
    "convolution",
    "convolution",
    "convolution, weight gradient",
  ], convs
  for _, flops in convs:
    np.testing.assert_allclose(flops, conv_flops)
  dots = [flops for cat, flops, _ in found if cat == "dot"]
  assert dots and all(f in (2.0 * n * h * w * o * 4,) for f in dots), dots
