"""A network from its config without random initialisation: what the importers, checkpoint
restore and parameter counts share.

    module = abstract(config)                  # parameters are jax.ShapeDtypeStruct
    params = fill(param_shapes(module))        # e.g. converted or restored weights
    model = with_params(module, params)
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddx.models import dtypes
from ddx.models.autoencoder import AutoencoderKL
from ddx.models.clip_text import CLIPTextEncoder
from ddx.models.configs import AutoencoderConfig, CLIPTextConfig, UNetCondConfig, UNetConfig
from ddx.models.unet import UNet
from ddx.models.unet_cond import UNetCond

NETWORKS = {
  UNetConfig: UNet,
  UNetCondConfig: UNetCond,
  AutoencoderConfig: AutoencoderKL,
  CLIPTextConfig: CLIPTextEncoder,
}


def abstract(config) -> nnx.Module:
  """The network of ``config`` (one of `ddx.models.configs`) with ``jax.ShapeDtypeStruct``
  parameters: nothing is allocated or initialised."""
  try:
    cls = NETWORKS[type(config)]
  except KeyError:
    raise TypeError(f"config: expected one of {[c.__name__ for c in NETWORKS]}, got {type(config).__name__}") from None
  return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def param_shapes(module: nnx.Module) -> dict:
  """The pure dict (``nnx.to_pure_dict``) of the module's parameters, e.g. an abstract one's
  shapes: the structure that checkpoints and converted weights fill."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def param_count(module: nnx.Module) -> int:
  """Number of parameters of ``module`` (an abstract one costs nothing)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(param_shapes(module))))


def with_params(module: nnx.Module, params: Mapping) -> nnx.Module:
  """``module`` (typically `abstract`) holding ``params``, a pure dict of `param_shapes`'s
  structure, cast to the module config's ``param_dtype``.

  Raises:
    ValueError: the structures differ, or the module has state besides its parameters.
  """
  graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("params: the module has non-Param state; cannot rebuild it from params alone")
  if jax.tree.structure(nnx.to_pure_dict(pstate)) != jax.tree.structure(dict(params)):
    raise ValueError(f"params: structure does not match the {type(module).__name__} built from the config")
  dtype = dtypes.DTYPES[module.config.param_dtype]
  nnx.replace_by_pure_dict(pstate, jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), dict(params)))
  return nnx.merge(graphdef, pstate, rest)
