"""Test setup shared by every tier.

* 8 fake CPU devices for the sharding tests (set before the first jax import).
* One compilation cache for the whole run: a temporary directory made by the first process
  (the pytest controller, or the only process without xdist), inherited by the xdist workers
  and by every ``python -m ddx`` subprocess a test starts, removed when the run ends. The same
  tiny programs are compiled once per run instead of once per test and per process; the
  user's own cache (~/.cache/ddx) is never touched.
* `ddx_cli`: the command line run in-process (no interpreter start, no re-import of JAX),
  returning the exit status and what it printed.
* `shared_dir`: something expensive (a trained tiny workdir, say) built once per run and
  shared by the xdist workers; tests that change it work on a copy (`copy_tree`).
"""

import contextlib
import fcntl
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "DDX_TEST_RUN_DIR" not in os.environ:  # the first process of the run: the workers inherit it
  os.environ["DDX_TEST_RUN_DIR"] = tempfile.mkdtemp(prefix="ddx-tests-")
  _OWNS_RUN_DIR = True
else:
  _OWNS_RUN_DIR = False
RUN_DIR = os.environ["DDX_TEST_RUN_DIR"]
os.environ["DDX_COMPILATION_CACHE"] = os.path.join(RUN_DIR, "jax-cache")
# tiny test programs compile in well under the product's threshold: cache them all
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402

from ddx.cli import main as cli_main  # noqa: E402
from ddx.cli import runtime  # noqa: E402
from tests import _torchvision_compat  # noqa: E402

_torchvision_compat.install()
runtime.enable_compilation_cache(os.environ["DDX_COMPILATION_CACHE"])


def pytest_unconfigure(config):
  del config
  if _OWNS_RUN_DIR:
    shutil.rmtree(RUN_DIR, ignore_errors=True)


@pytest.fixture
def ddx_cli(capsys):
  """``ddx_cli("train", "--workdir=...", ...) -> (status, stdout, stderr)``: `ddx.cli.main.execute`
  in this process, as ``python -m ddx`` would run it (errors as one line, exit status)."""

  def run(*argv):
    capsys.readouterr()
    code = cli_main.execute(["ddx", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err

  return run


@contextlib.contextmanager
def _locked(path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shared_dir(name: str, build) -> str:
  """``RUN_DIR/<name>``, made by ``build(path)`` the first time any process of the run asks
  (the others wait for it); a failed build leaves nothing behind and fails every asker."""
  path = os.path.join(RUN_DIR, name)
  with _locked(path + ".lock"):
    if not os.path.exists(path + ".done"):
      shutil.rmtree(path, ignore_errors=True)
      build(path)
      open(path + ".done", "w").close()
  return path


def copy_tree(src: str, dst) -> str:
  """A private copy of a shared directory for a test that changes it."""
  shutil.copytree(src, str(dst))
  return str(dst)
