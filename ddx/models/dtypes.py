"""The dtypes a model config may name: ``dtype`` (compute; None = the inputs' dtype) and
``param_dtype`` (storage). Configs hold canonical names so they stay JSON; modules resolve
them to jnp dtypes when they build their layers."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(dtype) -> str | None:
  """Canonical string for a dtype argument (None stays None); ValueError if unsupported."""
  if dtype is None:
    return None
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"dtype: unsupported dtype {dtype!r} (use one of {sorted(DTYPES)})")
  return name


def checked(dtype, param_dtype) -> dict:
  """``{"dtype": name or None, "param_dtype": name}``, validated (param_dtype is required)."""
  pd = dtype_name(param_dtype)
  if pd is None:
    raise ValueError("param_dtype: must not be None")
  return {"dtype": dtype_name(dtype), "param_dtype": pd}


def resolve(config) -> tuple:
  """``(compute dtype or None, param dtype)`` as jnp dtypes of a checked config's names."""
  return (DTYPES[config.dtype] if config.dtype else None), DTYPES[config.param_dtype]
