"""Test setup shared by every tier.

The tiers are directories: unit/ (pure functions and single modules, in-process), oracle/
(against the PyTorch reference implementations: diffusers, transformers, pytorch-fid),
integration/ (the loop, checkpoints and the command line, in-process, on tiny models) and
multiprocess/ (where a process boundary is the subject: kill -9, SIGTERM, several JAX
processes over 127.0.0.1, the launchers). ``pytest -m "not slow" tests`` is the quick tier
(everything but multiprocess/ and the few integration tests marked slow).

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

# XLA:CPU's backend optimisation level 0: the suite's programs are tiny and its time goes to
# compiling them, which level 0 roughly halves (LLVM's passes) while leaving the HLO, hence
# the arithmetic, as it is; the few tests that train for hundreds of steps run a little
# faster too, not slower (measured on the 2-core machine). Child processes inherit these
# flags (`tests._tiny.xla_flags`); benchmarks, docs and users run XLA's default, level 2.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
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


_TIERS = os.path.dirname(os.path.abspath(__file__))


# Tests that share something built once per run go to one xdist worker (--dist loadgroup):
# the other worker runs other tests instead of waiting for the build.
_GROUPS = {
  "_trained_run": "trained_tiny",
  "ae_workdir": "digits_latent",
  "sd_folder": "sd_folder",
}


def pytest_itemcollected(item):
  """The tiers by directory: tests/multiprocess/ is ``slow`` (left out of the quick tier,
  ``-m "not slow"``), tests/oracle/ is ``torch`` (the PyTorch references); the xdist groups.
  Marked as each test is collected, so the marks are there when xdist's worker names each
  grouped test by its group (in its ``pytest_collection_modifyitems``)."""
  for fixture, group in _GROUPS.items():
    if fixture in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group(group))
      break
  tier = os.path.relpath(str(item.path), _TIERS).split(os.sep)[0]
  if tier == "multiprocess":
    item.add_marker(pytest.mark.slow)
  elif tier == "oracle":
    item.add_marker(pytest.mark.torch)


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


@pytest.fixture(scope="session")
def _trained_run():
  from tests._tiny import TRAIN_FLAGS

  def build(path):
    argv = ["ddx", "train", f"--workdir={path}", *TRAIN_FLAGS, "--config.train.total_steps=12"]
    assert cli_main.execute(argv) == 0

  return shared_dir("trained_tiny", build)


@pytest.fixture(scope="session")
def trained_workdir(_trained_run):
  """``trained_workdir(dst) -> dst``: a copy of the run's one trained tiny workdir (12 steps of
  `tests._tiny.TRAIN_FLAGS` in-process, on the 8 test devices; checkpoints 8 and 12)."""
  return lambda dst: copy_tree(_trained_run, dst)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
  """``(path, diffusers pipeline)``: a tiny random Stable Diffusion pipeline folder (needs the
  torch extras; tests using it skip without them)."""
  from tests._latent_refs import build_sd_pipeline

  return build_sd_pipeline(tmp_path_factory.mktemp("sd_pipe"))


@pytest.fixture(scope="session")
def gcs():
  """A Google Cloud Storage emulator on 127.0.0.1 for this test process (`tests._storage`),
  its environment set here (inherited by child processes): yields the `Emulator`
  (``gcs.root(name)`` -> ``gs://ddx-test/<name>``)."""
  from tests._storage import Emulator

  emu = Emulator("gs").start()
  saved_env = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)
  try:
    yield emu
  finally:
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    emu.stop()
