"""Helpers for the latent-stack tests: reference imports and allocation-cheap random models.

`numpy_init` builds an NNX module abstractly and fills its parameters from a seeded numpy
generator: eager ``nnx`` initialisation compiles one XLA program per initializer call, which
costs tens of seconds on a busy 2-core machine for no benefit to a test.


`refs()` skips the calling test when a library is missing. A torchvision that is installed
but cannot load (e.g. a CUDA wheel next to a CPU torch, which pytorch-fid can pull in) would
make every transformers-backed diffusers model fail to import; none of these oracles needs
torchvision, so such a broken install is hidden from the import system first.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


def _hide_broken_torchvision():
  if "torchvision" in sys.modules:
    return
  try:
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return
  except Exception:  # pylint: disable=broad-except  (its C extension failed to register)
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
      del sys.modules[k]
    sys.modules["torchvision"] = None  # importlib.util.find_spec now reports it absent


def refs():
  """``(torch, diffusers, transformers)``; skips the test if any is missing."""
  torch = pytest.importorskip("torch")
  _hide_broken_torchvision()
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  torch.set_num_threads(1)
  return torch, diffusers, transformers


def numpy_init(make, seed=0, scale=0.2):
  """``make()`` (a function building an NNX module from ``nnx.Rngs(0)``) with parameters drawn
  from ``normal(0, scale / sqrt(fan_in))`` (kernels) / ``1 + normal(0, scale)`` (norm scales) /
  ``normal(0, scale)`` (biases, embeddings), by a seeded numpy generator."""
  module = nnx.eval_shape(make)
  graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = str(path[-1])
    shape = leaf.shape
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      a = rng.randn(*shape) / np.sqrt(fan_in)
    elif name == "scale":
      a = 1.0 + scale * rng.randn(*shape)
    else:
      a = scale * rng.randn(*shape)
    return jnp.asarray(a, leaf.dtype)

  pure = nnx.to_pure_dict(pstate)
  pure = jax.tree_util.tree_map_with_path(lambda p, l: fill([k.key for k in p], l), pure)
  nnx.replace_by_pure_dict(pstate, pure)
  return nnx.merge(graphdef, pstate, rest)
