"""Process-level JAX setup for the ``ddx`` command: default XLA:CPU flags and the
persistent compilation cache.

`setup` is called once by the command dispatcher (`ddx.cli.main.run`) before any JAX backend is
initialised (XLA reads ``XLA_FLAGS`` when the first backend starts, not at ``import jax``).
The library itself never calls it: importing ``ddx`` changes no global JAX state.

* XLA flags: ``CPU_XLA_FLAGS`` is exported as ``XLA_FLAGS`` only when the backend will be
  the CPU (``JAX_PLATFORMS`` starts with ``cpu``, or no accelerator plugin and device is
  present) and the user has not set ``XLA_FLAGS`` (theirs always win, even empty).
* Compilation cache: compiled programs are stored in ``$DDX_COMPILATION_CACHE`` (default
  ``$XDG_CACHE_HOME/ddx/jax``, i.e. ``~/.cache/ddx/jax``), so a second ``ddx sample`` or
  ``ddx train`` with the same shapes loads its programs instead of recompiling them.
  ``DDX_COMPILATION_CACHE=off`` (or ``0``, ``false``, ``none``, empty) turns it off.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import MutableMapping

import jax

CACHE_ENV = "DDX_COMPILATION_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")

# Measured on the CIFAR-10 U-Net (benchmarks/vs_pytorch.py); see docs/benchmarks.md, "Speed on CPU".
CPU_XLA_FLAGS = ""

# Programs that compile faster than this are not worth a disk entry.
MIN_COMPILE_SECONDS = 0.5


def _accelerator_present() -> bool:
  """True when JAX, left to choose, would pick a TPU or GPU over the CPU."""
  tpu = importlib.util.find_spec("libtpu") is not None and bool(
    glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  )
  gpu_plugin = any(
    importlib.util.find_spec(m) is not None
    for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
  )
  gpu = gpu_plugin and bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))
  return tpu or gpu


def _backends_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge is not None and getattr(bridge, "_backends", None))


def backend_will_be_cpu(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Whether JAX's default backend in this process will be the CPU (decided before import)."""
  platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not _accelerator_present()


def configure_xla_flags(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """Export ``CPU_XLA_FLAGS`` as ``XLA_FLAGS`` if allowed (see the module docstring).

  Returns the flags set, or None when nothing was changed.
  """
  if not CPU_XLA_FLAGS or "XLA_FLAGS" in environ:
    return None
  if _backends_started():  # too late: XLA has already read XLA_FLAGS
    return None
  if not backend_will_be_cpu(environ):
    return None
  environ["XLA_FLAGS"] = CPU_XLA_FLAGS
  return CPU_XLA_FLAGS


def cache_dir(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """The persistent compilation cache directory, or None when turned off."""
  value = environ.get(CACHE_ENV)
  if value is not None:
    if value.strip().lower() in _OFF:
      return None
    return os.path.abspath(os.path.expanduser(value))
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ddx", "jax")


def enable_compilation_cache(path: str, environ: MutableMapping[str, str] = os.environ) -> None:
  """Store and reuse compiled XLA programs in ``path`` (created if missing): those that took
  at least `MIN_COMPILE_SECONDS` to compile, or ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
  when set (JAX's own setting wins)."""
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def setup(environ: MutableMapping[str, str] = os.environ) -> dict:
  """XLA flags, then the compilation cache; returns what was done (for logs and tests)."""
  flags = configure_xla_flags(environ)
  path = cache_dir(environ)
  if path is not None:
    enable_compilation_cache(path)
  return {"xla_flags": flags, "compilation_cache": path}
