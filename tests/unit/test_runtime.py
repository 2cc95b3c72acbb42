"""ddx.cli.runtime: XLA:CPU flags and the persistent compilation cache of the ``ddx`` command."""

import os
import subprocess
import sys
import textwrap

from ddx.cli import runtime

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_user_xla_flags_always_win(monkeypatch):
  monkeypatch.setattr(runtime, "CPU_XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  for user in ("--xla_dump_to=/tmp/x", ""):
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": user}
    assert runtime.configure_xla_flags(env) is None
    assert env["XLA_FLAGS"] == user


def test_flags_only_for_cpu(monkeypatch):
  monkeypatch.setattr(runtime, "CPU_XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.setattr(runtime, "_backends_started", lambda: False)
  for platforms in ("tpu", "cuda", "gpu,cpu"):
    env = {"JAX_PLATFORMS": platforms}
    assert runtime.configure_xla_flags(env) is None and "XLA_FLAGS" not in env
  env = {"JAX_PLATFORMS": "cpu"}
  assert runtime.configure_xla_flags(env) == runtime.CPU_XLA_FLAGS == env["XLA_FLAGS"]


def test_no_flags_once_a_backend_started(monkeypatch):
  monkeypatch.setattr(runtime, "CPU_XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  monkeypatch.setattr(runtime, "_backends_started", lambda: True)
  env = {"JAX_PLATFORMS": "cpu"}
  assert runtime.configure_xla_flags(env) is None and "XLA_FLAGS" not in env


def test_backend_detection():
  assert runtime.backend_will_be_cpu({"JAX_PLATFORMS": "cpu"})
  assert runtime.backend_will_be_cpu({"JAX_PLATFORMS": "CPU,tpu"})
  assert not runtime.backend_will_be_cpu({"JAX_PLATFORMS": "tpu,cpu"})
  assert not runtime.backend_will_be_cpu({"JAX_PLATFORM_NAME": "gpu"})
  # this machine has no accelerator: left to choose, JAX takes the CPU
  assert runtime.backend_will_be_cpu({})


def test_cache_dir(tmp_path):
  assert runtime.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == os.path.join(tmp_path, "ddx", "jax")
  assert runtime.cache_dir({"DDX_COMPILATION_CACHE": str(tmp_path / "c")}) == str(tmp_path / "c")
  for off in ("off", "0", "false", "none", "", "OFF"):
    assert runtime.cache_dir({"DDX_COMPILATION_CACHE": off}) is None
  home = runtime.cache_dir({})
  assert home.endswith(os.path.join(".cache", "ddx", "jax"))


def _run(code: str, env: dict) -> str:
  env = {**os.environ, **env, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, check=False, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip().splitlines()[-1]


CACHED = """
  import time
  from ddx.cli import runtime
  runtime.MIN_COMPILE_SECONDS = 0.0
  done = runtime.setup()
  import jax, jax.numpy as jnp
  assert jax.config.jax_compilation_cache_dir == done["compilation_cache"]
  hits = []
  jax.monitoring.register_event_listener(
      lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) * 3.0)
  f(jnp.ones((8, 8))).block_until_ready()
  print(done["compilation_cache"], len(hits))
"""


def test_second_process_reuses_compiled_program(tmp_path):
  cache = tmp_path / "cache"
  env = {"DDX_COMPILATION_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
  path, hits = _run(CACHED, env).split()
  assert path == str(cache) and hits == "0"  # compiled and written ...
  assert os.listdir(cache)
  path, hits = _run(CACHED, env).split()
  assert int(hits) >= 1  # ... and read back by the next process


def test_cache_off(tmp_path):
  env = {"DDX_COMPILATION_CACHE": "off", "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path)}
  assert _run(CACHED, env) == "None 0"
  assert not (tmp_path / "ddx").exists()


def test_library_import_changes_nothing():
  out = _run(
    """
    import os, ddx, ddx.models, jax
    print(os.environ.get("XLA_FLAGS"), jax.config.jax_compilation_cache_dir)
  """,
    {"JAX_PLATFORMS": "cpu"},
  )
  assert out == "None None"
