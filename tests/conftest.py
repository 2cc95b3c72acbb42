"""Test setup: 8 fake CPU devices for sharding tests (must precede the first jax import)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# `ddx` commands run by the tests do not write to the user's compilation cache.
os.environ.setdefault("DDX_COMPILATION_CACHE", "off")

from tests import _torchvision_compat  # noqa: E402

_torchvision_compat.install()
