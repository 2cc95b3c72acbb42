"""The tiny models, workdirs and runners the tests share (one copy of each).

* `TRAIN_FLAGS`: ``ddx train`` flags for the tiny digits run every command-line training
  test uses (8x8 digits, a one-level U-Net): compiling its train step is what such tests cost,
  so they all compile the same program and the run's compilation cache serves them.
* `EVAL_MODEL`: a 16x16 U-Net that the digits feature network can measure; `random_workdir`
  writes a workdir of it with seeded random weights (no training, no init compile).
* `numpy_init`: a module built abstractly with parameters from a seeded numpy generator.
  Eager ``nnx`` initialisation compiles one XLA program per initializer and shape (0.7 s
  each for a truncated normal on a 2-core machine, 14 s for a small U-Net) for no benefit to
  a test that only needs some weights.
* `PixelModel` / `loop_run`: a per-pixel MLP for tests of the training loop's mechanics
  (resume, set-aside, non-finite handling), where the network does not matter.
* `run_ddx`: ``python -m ddx`` in a subprocess, for tests whose subject is a process boundary
  (kill -9, SIGTERM, several JAX processes, launchers); everything else runs the command
  line in-process (the ``ddx_cli`` fixture).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ddx
from ddx import parallel
from ddx.cli import config as config_lib
from ddx.models import UNetConfig, abstract, param_shapes
from ddx.models.io import diffusers as convert
from ddx.training import checkpoint, loop
from ddx.training import step as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSION = convert.diffusers_scheduler_to_diffusion(None)

TRAIN_FLAGS = [
  f"--config={ROOT}/configs/digits.py",
  "--config.data.image_size=8",
  "--config.model.image_size=8",
  "--config.model.base_channels=8",
  "--config.model.channel_mult=(1,)",
  "--config.model.attention_resolutions=()",
  "--config.model.norm_num_groups=4",
  "--config.model.dropout=0.1",
  "--config.train.global_batch_size=8",
  "--config.train.log_every_seconds=0.5",
  "--config.train.sample_every=0",
  "--config.optim.warmup_steps=2",
  "--config.train.checkpoint_every=4",
  "--config.train.keep_checkpoints=2",
]
# the same network as a UNet config (tests of the step and of restoring)
TRAIN_MODEL = dict(
  image_size=8,
  in_channels=1,
  base_channels=8,
  channel_mult=(1,),
  num_res_blocks=2,
  attention_resolutions=(),
  norm_num_groups=4,
  dropout=0.1,
)
# 16x16x1: what the digits feature network measures
EVAL_MODEL = dict(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), norm_num_groups=4)


def digits_config(**model):
  """The validated ``configs/digits.py`` config with model fields replaced (a model
  ``image_size`` is the data's too)."""
  sys.path.insert(0, ROOT)
  from configs import digits  # noqa: PLC0415 -- configs/ is on sys.path only now

  c = digits.get_config()
  for k, v in model.items():
    setattr(c.model, k, v)
  if "image_size" in model:
    c.data.image_size = model["image_size"]
  return config_lib.validate(c)


def random_params(config: UNetConfig, seed: int, scale: float = 0.05):
  """Seeded normal weights of ``config``'s shapes, made in numpy (nothing compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(abstract(config))
  )


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


def random_workdir(path: str, *, step: int = 3, seed: int = 0, **model) -> str:
  """A workdir of the digits config with ``EVAL_MODEL`` (or ``model``) and one checkpoint of
  seeded random weights at ``step``."""
  cfg = digits_config(**{**EVAL_MODEL, **model})
  params = random_params(UNetConfig.from_json(cfg["model"]), seed)
  checkpoint.save(path, step, {"params": params, "ema_params": params}, config=cfg)
  return path


class PixelModel(nnx.Module):
  """``(x [B, H, W, C], t [B]) -> eps``: one hidden layer per pixel, fed the pixel and t / T; a
  real trainable model that compiles in a moment (the loop and the checkpoints do not depend
  on the architecture)."""

  def __init__(self, rngs):
    # 512 wide: arrays above orbax's 1 KiB inline limit land in the data files tests damage
    self.lin = nnx.Linear(2, 512, rngs=rngs)
    self.out = nnx.Linear(512, 1, rngs=rngs)

  def __call__(self, x, t, y=None, dropout_key=None):
    del y, dropout_key
    tt = jnp.broadcast_to((t.astype(x.dtype) / 1000.0)[:, None, None, None], x.shape)
    return self.out(jax.nn.silu(self.lin(jnp.stack([x, tt], -1))))[..., 0]


def loop_run(
  workdir,
  total_steps,
  *,
  source=None,
  mesh=None,
  stop_after_steps=None,
  num_classes=None,
  sample=None,
  sample_every=0,
  max_nonfinite=10,
  fsdp_min_size=None,
):
  """`ddx.training.loop.run` of `PixelModel` on 8x8 digits (checkpoints every 2 steps, 2 kept;
  ``fsdp_min_size``: the sharding rules' threshold on a mesh with an fsdp axis)."""
  spec = loop.LoopSpec(
    seed=0,
    global_batch_size=8,
    total_steps=total_steps,
    checkpoint_every=2,
    keep_checkpoints=2,
    sample_every=sample_every,
    log_every_seconds=100.0,
    max_nonfinite=max_nonfinite,
    **({} if fsdp_min_size is None else {"sharding_rules": parallel.ShardingRules(min_size=fsdp_min_size)}),
  )
  return loop.run(
    workdir,
    {"model": {"pixel": 512}, "diffusion": DIFFUSION},
    model_factory=PixelModel,
    num_classes=num_classes,
    use_dropout=False,
    source=source if source is not None else ddx.data.make_source("digits", image_size=8),
    sched=ddx.schedules.make("linear", 1000),
    optim=train_lib.OptimizerSpec(learning_rate=1e-2, warmup_steps=1),
    loss=train_lib.LossSpec(),
    loop=spec,
    sample=sample or loop.SampleSpec(),
    mesh=mesh if mesh is not None else parallel.data_mesh(jax.devices()[:1]),
    stop_after_steps=stop_after_steps,
  )


# --- subprocesses ---------------------------------------------------------------------------


def xla_flags(devices: int) -> str:
  """This process's ``XLA_FLAGS`` (the suite's, tests/conftest.py) with ``devices`` fake CPU
  devices instead of its own count."""
  count = "--xla_force_host_platform_device_count"
  keep = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
  return " ".join([*keep, f"{count}={devices}"])


def subprocess_env(devices: int = 1, **extra) -> dict:
  """This environment for a child process with ``devices`` fake CPU devices and this checkout
  first on the path (the run's compilation cache is inherited)."""
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=xla_flags(devices),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
  )
  env.update(extra)
  return env


def run_ddx(args, devices: int = 1, check: bool = True, timeout: float = 600):
  """``python -m ddx *args`` in a child process; raises with its output unless it succeeds
  (or ``check=False``)."""
  p = subprocess.run(
    [sys.executable, "-m", "ddx", *args],
    cwd=ROOT,
    env=subprocess_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and p.returncode != 0:
    raise AssertionError(f"ddx {args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


# --- comparing runs -------------------------------------------------------------------------


def saved(workdir, step=None):
  """Raw restore of every item of a checkpoint (numpy leaves), for bitwise comparison."""
  return checkpoint.restore(workdir, step, {"params": None, "ema_params": None, "opt_state": None, "train": None})


def assert_bitwise_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) and len(la) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_params_close(a, b, tol=1e-5):
  """Equal within tol, except attention key biases: softmax is invariant to them, so their
  true gradient is exactly 0 and what autodiff returns is rounding noise (~1e-9) that
  depends on reduction order; Adam normalises that noise into lr-sized steps."""
  fa = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert fa.keys() == fb.keys()
  checked = 0
  for path, x in fa.items():
    name = jax.tree_util.keystr(path)
    if "to_k" in name and "bias" in name:
      continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(fb[path]), atol=tol, rtol=tol, err_msg=name)
    checked += 1
  assert checked > 10


def run_processes(script: str, *args: str, num: int = 2, devices: int = 1, timeout: float = 300):
  """``python -c script <process id> <port> *args`` as ``num`` JAX processes over 127.0.0.1
  (the script calls ``jax.distributed.initialize`` itself): ``[(output, exit status)]`` in
  process order, stderr merged into the output."""
  port = str(free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", script, str(pid), port, *args],
      cwd=ROOT,
      env=subprocess_env(devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(num)
  ]
  try:
    return [(p.communicate(timeout=timeout)[0], p.returncode) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def config(name: str, **overrides):
  """``configs/<name>.py``'s ConfigDict with ``section__field=value`` overrides."""
  import importlib  # noqa: PLC0415
  import sys  # noqa: PLC0415

  sys.path.insert(0, ROOT)
  c = importlib.import_module(f"configs.{name}").get_config()
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c
