"""Training system: device-count invariance, non-finite handling, checkpoints and resume,
preemption, real multi-process training over loopback, the command line."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ddx
from ddx import data, parallel
from ddx.models import UNet
from ddx.training import checkpoint, loop
from ddx.training import step as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(
  image_size=8,
  in_channels=1,
  base_channels=8,
  channel_mult=(1, 2),
  num_res_blocks=1,
  attention_resolutions=(4,),
  norm_num_groups=4,
  dropout=0.1,
)
TINY_FLAGS = [
  "--config=configs/digits.py",
  "--config.data.image_size=8",
  "--config.model.image_size=8",
  "--config.model.base_channels=8",
  "--config.model.channel_mult=(1,2)",
  "--config.model.attention_resolutions=(4,)",
  "--config.model.norm_num_groups=4",
  "--config.model.dropout=0.1",
  "--config.train.global_batch_size=8",
  "--config.train.log_every_seconds=0.5",
  "--config.train.sample_every=0",
  "--config.optim.warmup_steps=2",
  "--config.train.checkpoint_every=2",
  "--config.train.keep_checkpoints=2",
]


def _env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _ddx(args, devices=1, check=True, timeout=600):
  p = subprocess.run(
    [sys.executable, "-m", "ddx", *args], cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout
  )
  if check and p.returncode != 0:
    raise AssertionError(f"ddx {args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p


def _saved(workdir, step=None):
  """Raw restore of every item of a checkpoint (numpy leaves), for bitwise comparison."""
  step, items = checkpoint.restore(
    workdir, step, {"params": None, "ema_params": None, "opt_state": None, "train": None}
  )
  return step, items


def _assert_bitwise_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) and len(la) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_params_close(a, b, tol=1e-5):
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


# --- in-process: the pure step -------------------------------------------------------------


def _setup(mesh, steps_per_call=1, dropout=True, unroll=None):
  model = UNet(**TINY_MODEL, rngs=nnx.Rngs(params=jax.random.key(0)))
  spec = train_lib.OptimizerSpec(learning_rate=1e-3, warmup_steps=2)
  tx = train_lib.make_optimizer(spec)
  graphdef, state = train_lib.init_state(model, tx, jax.random.key(1))
  fn = train_lib.make_train_fn(
    mesh,
    steps_per_call,
    unroll=unroll,
    graphdef=graphdef,
    sched=ddx.schedules.make("linear", 1000),
    tx=tx,
    lr_fn=train_lib.learning_rate_fn(spec),
    loss=train_lib.LossSpec(),
    ema_decay=0.99,
    ema_warmup=True,
    num_classes=None,
    label_dropout=0.0,
    use_dropout=dropout,
  )
  return fn, train_lib.replicate(state, mesh)


def _batches(mesh, step, k, B=16, poison=False):
  src = data.make_source("digits")
  bs = [data.get_batch(src, step + i, seed=0, global_batch_size=B) for i in range(k)]
  out = {key: np.stack([b[key] for b in bs]) for key in ("image", "label")}
  if poison:
    out["image"][:, 0, 0, 0, 0] = np.nan
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
  return {key: jax.device_put(v, sh) for key, v in out.items()}


def test_device_count_invariance_1_vs_8_devices():
  results = []
  for n in (1, 8):
    mesh = parallel.data_mesh(jax.devices()[:n])
    fn, state = _setup(mesh)
    for s in range(3):
      state, _ = fn(state, _batches(mesh, s, 1))
    results.append(jax.device_get(state))
  a, b = results
  assert int(a.step) == int(b.step) == 3
  _assert_params_close(a.params, b.params)
  _assert_params_close(a.ema_params, b.ema_params)
  # and training really moved the parameters
  _, s0 = _setup(parallel.data_mesh(jax.devices()[:1]))
  diff = max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(jax.device_get(s0.params)))
  )
  assert diff > 1e-4


def test_scan_and_unrolled_multistep_agree():
  mesh = parallel.data_mesh(jax.devices()[:2])
  outs = []
  for unroll in (True, False):
    fn, state = _setup(mesh, steps_per_call=2, dropout=False, unroll=unroll)
    state, m = fn(state, _batches(mesh, 0, 2))
    outs.append((jax.device_get(state), jax.device_get(m)))
  _assert_params_close(outs[0][0].params, outs[1][0].params)
  assert outs[0][1]["loss"].shape == (2,)


def test_nonfinite_step_is_skipped_and_counted():
  mesh = parallel.data_mesh(jax.devices()[:1])
  fn, state = _setup(mesh)
  state, _ = fn(state, _batches(mesh, 0, 1))
  before = jax.device_get(state)
  state, m = fn(state, _batches(mesh, 1, 1, poison=True))
  after = jax.device_get(state)
  assert not bool(m["finite"][0]) and not np.isfinite(float(m["loss"][0]))
  assert int(after.step) == 2 and int(after.nonfinite) == 1 and int(after.skipped) == 1
  _assert_bitwise_equal(before.params, after.params)
  _assert_bitwise_equal(before.ema_params, after.ema_params)
  _assert_bitwise_equal(before.opt_state, after.opt_state)
  state, m = fn(state, _batches(mesh, 2, 1))
  assert bool(m["finite"][0]) and int(jax.device_get(state.nonfinite)) == 0
  assert int(jax.device_get(state.skipped)) == 1


def test_checkpointer_refuses_nan(tmp_path):
  mesh = parallel.data_mesh(jax.devices()[:1])
  _, state = _setup(mesh)
  bad = state.replace(params=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params))
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  with pytest.raises(ValueError, match="non-finite"):
    ck.save(0, train_lib.checkpoint_items(bad))
  ck.close()
  assert checkpoint.all_steps(str(tmp_path)) == []


class _NaNSource:
  """Digits with every image NaN: every step is non-finite."""

  def __init__(self):
    self.base = data.make_source("digits")
    self.image_shape, self.num_classes = self.base.image_shape, self.base.num_classes

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    ex = dict(self.base[i])
    ex["image"] = np.full_like(ex["image"], np.nan)
    return ex


def test_divergence_stops_with_clear_error_and_clean_checkpoints(tmp_path):
  from ddx.cli import config as config_lib

  cfg = {
    "model": TINY_MODEL,
    "diffusion": {
      "num_timesteps": 1000,
      "beta_schedule": "linear",
      "beta_start": 1e-4,
      "beta_end": 0.02,
      "prediction": "eps",
      "variance": "fixed_large",
    },
  }
  spec = loop.LoopSpec(
    seed=0, global_batch_size=8, total_steps=20, checkpoint_every=2, max_nonfinite=3, log_every_seconds=100.0
  )
  with pytest.raises(loop.TrainingDiverged, match="3 consecutive non-finite"):
    loop.run(
      str(tmp_path),
      cfg,
      model_factory=lambda r: UNet(**TINY_MODEL, rngs=r),
      num_classes=None,
      use_dropout=True,
      source=_NaNSource(),
      sched=ddx.schedules.make("linear", 1000),
      optim=train_lib.OptimizerSpec(warmup_steps=1),
      loss=train_lib.LossSpec(),
      loop=spec,
      sample=loop.SampleSpec(),
      mesh=parallel.data_mesh(jax.devices()[:1]),
    )
  del config_lib
  for step in checkpoint.all_steps(str(tmp_path)):
    _, items = _saved(str(tmp_path), step)
    for leaf in jax.tree_util.tree_leaves((items["params"], items["ema_params"], items["opt_state"])):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


# --- the command line: train, resume, kill, preempt, sample ------------------------------------


def test_cli_train_kill9_resume_is_bitwise_identical(tmp_path):
  total = ["--config.train.total_steps=12"]
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _ddx(["train", f"--workdir={a}", *TINY_FLAGS, *total])
  # b: killed with SIGKILL at a random point after its first checkpoint, then rerun
  proc = subprocess.Popen(
    [sys.executable, "-m", "ddx", "train", f"--workdir={b}", *TINY_FLAGS, *total],
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not checkpoint.all_steps(b) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  time.sleep(random.uniform(0.0, 0.5))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = checkpoint.latest_step(b)
  assert killed_at is not None and killed_at < 12, killed_at
  out = _ddx(["train", f"--workdir={b}", *TINY_FLAGS, *total])
  assert "resumed from" in out.stdout
  sa, ia = _saved(a)
  sb, ib = _saved(b)
  assert sa == sb == 12
  for k in ("params", "ema_params", "opt_state", "train"):
    _assert_bitwise_equal(ia[k], ib[k])
  # metrics.jsonl has no duplicated steps after the resume
  steps = [json.loads(l)["step"] for l in open(os.path.join(b, "metrics.jsonl"))]
  assert steps == sorted(set(steps))
  # a single-process sampler over 2 devices reads the run (PNG grid + npz); the restored
  # weights must be replicated onto the mesh the batch is sharded over
  s = _ddx(["sample", f"--workdir={b}", "--steps=3", "--num=4"], devices=2)
  assert os.path.exists(glob.glob(os.path.join(b, "samples", "sample_*_ddim3.png"))[0])
  npz = np.load(glob.glob(os.path.join(b, "samples", "sample_*_ddim3.npz"))[0])
  assert npz["samples"].shape == (4, 8, 8, 1) and np.all(np.isfinite(npz["samples"]))
  assert "wrote" in s.stdout


def test_cli_partial_checkpoint_write_and_corrupt_checkpoint(tmp_path):
  wd = str(tmp_path / "w")
  _ddx(["train", f"--workdir={wd}", *TINY_FLAGS, "--config.train.total_steps=4"])
  assert checkpoint.all_steps(wd) == [2, 4]
  # an interrupted write leaves orbax's temporary directory: it is not a checkpoint
  tmp = os.path.join(wd, "checkpoints", "6.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(tmp, "params"))
  open(os.path.join(tmp, "params", "garbage"), "w").write("x")
  assert checkpoint.latest_step(wd) == 4
  out = _ddx(["train", f"--workdir={wd}", *TINY_FLAGS, "--config.train.total_steps=6"])
  assert "resumed from" in out.stdout and checkpoint.latest_step(wd) == 6
  # a committed checkpoint with a damaged file: a one-line error naming the checkpoint
  for f in glob.glob(os.path.join(wd, "checkpoints", "6", "*params", "**", "*"), recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 0:
      open(f, "wb").write(b"\0garbage")
  bad = _ddx(["sample", f"--workdir={wd}", "--steps=2", "--num=2"], check=False)
  assert bad.returncode != 0 and "checkpoint" in bad.stderr.splitlines()[-1], bad.stderr[-500:]
  assert "Traceback" not in bad.stderr


def test_cli_sigterm_saves_and_exits_cleanly(tmp_path):
  wd = str(tmp_path / "t")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "ddx",
      "train",
      f"--workdir={wd}",
      *TINY_FLAGS,
      "--config.train.total_steps=100000",
      "--config.train.checkpoint_every=50000",
    ],
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(os.path.join(wd, "metrics.jsonl")) and os.path.getsize(os.path.join(wd, "metrics.jsonl")):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  assert "preemption signal" in out
  step = checkpoint.latest_step(wd)
  assert step is not None and 0 < step < 100000


def test_cli_bad_inputs(tmp_path):
  cases = [
    (["train", f"--workdir={tmp_path}/x", *TINY_FLAGS, "--config.optim.learning_rate=-1"], "optim.learning_rate"),
    (["train", f"--workdir={tmp_path}/x", *TINY_FLAGS, "--config.optim.nope=1"], "optim.nope"),
    (["train", f"--workdir={tmp_path}/x", *TINY_FLAGS, "--config.model.norm_num_groups=3"], "model.norm_num_groups"),
    (["train", f"--workdir={tmp_path}/x", *TINY_FLAGS, "--config.train.steps_per_call=3"], "steps_per_call"),
    (["train", f"--workdir={tmp_path}/x", *TINY_FLAGS, "--config.diffusion.variance=learned"], "diffusion.variance"),
    (["sample", f"--workdir={tmp_path}/missing"], "workdir does not exist"),
    (["sample", f"--workdir={tmp_path}"], "no config.json"),
  ]
  for args, needle in cases:
    p = _ddx(args, check=False, timeout=120)
    assert p.returncode != 0, args
    last = (p.stderr.strip().splitlines() or [""])[-1]
    assert needle in last and "Traceback" not in p.stderr, (args, p.stderr[-800:])
  assert not os.path.exists(f"{tmp_path}/x/checkpoints")


# --- real multi-process JAX over loopback ---------------------------------------------------


def test_multihost_2x2_matches_single_process_4_devices(tmp_path):
  mh, sp = str(tmp_path / "mh"), str(tmp_path / "sp")
  args = [
    *TINY_FLAGS,
    "--config.train.total_steps=4",
    "--config.train.sample_every=4",
    "--config.sample.num=8",
    "--config.sample.steps=2",
  ]
  p = subprocess.run(
    [
      "bash",
      "launch/local_multihost.sh",
      "2",
      "2",
      "--",
      sys.executable,
      "-m",
      "ddx",
      "train",
      f"--workdir={mh}",
      *args,
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "2 processes" in p.stdout and "4 devices" in p.stdout, p.stdout[-2000:]
  # the sample grid, sharded over both processes, is gathered and written once by process 0
  assert os.path.exists(os.path.join(mh, "samples", "step_00000004.png"))
  assert np.load(os.path.join(mh, "samples", "step_00000004.npz"))["samples"].shape == (8, 8, 8, 1)
  _ddx(["train", f"--workdir={sp}", *args], devices=4)
  _, a = _saved(mh)
  _, b = _saved(sp)
  _assert_params_close(a["params"], b["params"])
  _assert_params_close(a["ema_params"], b["ema_params"])
  # one process restores the multi-host checkpoint and samples from it
  _ddx(["sample", f"--workdir={mh}", "--steps=2", "--num=4"])
