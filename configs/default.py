"""Default config (the schema lives in ddx/cli/defaults.py; every key is listed there)."""

from ddx.cli.defaults import get_config  # noqa: F401
