"""Test setup: 8 fake CPU devices for sharding tests (must precede the first jax import)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tests import _torchvision_compat  # noqa: E402

_torchvision_compat.install()
