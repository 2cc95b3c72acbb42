"""The training step and loop in-process: device-count invariance, the scanned and unrolled
multi-step calls, non-finite steps skipped and counted, divergence, and ``ddx train`` on the
command line (resume past a half-written step, a damaged checkpoint, bad input).

What needs a process boundary (kill -9, SIGTERM, several JAX processes) is in
tests/multiprocess/.
"""

import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ddx
from ddx import data, parallel
from ddx.training import checkpoint, workdir_lock
from ddx.training import step as train_lib
from tests._tiny import (
  TRAIN_FLAGS,
  PixelModel,
  assert_bitwise_equal,
  loop_run,
)

# --- the pure step ------------------------------------------------------------------------


def _setup(mesh, model_factory, steps_per_call=1, dropout=True, unroll=None, grad_accum=1, rules=None):
  """``(train fn, placed state)``; with ``rules`` the state is sharded by them over ``mesh``'s
  fsdp axis and built straight into its shards, as `ddx.training.loop.run` does."""
  spec = train_lib.OptimizerSpec(learning_rate=1e-3, warmup_steps=2)
  tx = train_lib.make_optimizer(spec)
  sh = None
  if rules is not None:
    abstract = train_lib.abstract_state(model_factory, tx, jax.random.key(0), jax.random.key(1))[1]
    sh = train_lib.state_shardings(abstract, mesh, tx, rules)
  graphdef, state = train_lib.create_state(model_factory, tx, jax.random.key(0), jax.random.key(1), shardings=sh)
  fn = train_lib.make_train_fn(
    mesh,
    steps_per_call,
    unroll=unroll,
    shardings=sh,
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
    grad_accum=grad_accum,
  )
  return fn, (parallel.replicate(state, mesh) if sh is None else state)


def _batches(mesh, step, k, B=16, poison=False):
  src = data.make_source("digits", image_size=8)
  bs = [data.get_batch(src, step + i, seed=0, global_batch_size=B) for i in range(k)]
  out = {key: np.stack([b[key] for b in bs]) for key in ("image", "label")}
  if poison:
    out["image"][:, 0, 0, 0, 0] = np.nan
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.batch_axes(mesh)))
  return {key: jax.device_put(v, sh) for key, v in out.items()}


def test_scan_and_unrolled_multistep_agree():
  mesh = parallel.data_mesh(jax.devices()[:2])
  outs = []
  for unroll in (True, False):
    fn, state = _setup(mesh, PixelModel, steps_per_call=2, dropout=False, unroll=unroll)
    state, m = fn(state, _batches(mesh, 0, 2))
    outs.append((jax.device_get(state), jax.device_get(m)))
  (a, ma), (b, mb) = outs
  assert int(a.step) == int(b.step) == 2 and ma["loss"].shape == mb["loss"].shape == (2,)
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)


def test_grad_accum_equals_one_step_on_the_whole_batch():
  """k micro-batches and one update equal one step on the whole batch (t, eps drawn for the
  whole batch): 3 steps of batch 16 on 2 devices, k = 4 (4 examples, 2 per device) vs k = 1."""
  mesh = parallel.data_mesh(jax.devices()[:2])
  outs = []
  for k in (1, 4):
    fn, state = _setup(mesh, PixelModel, dropout=False, grad_accum=k)
    initial = jax.tree_util.tree_leaves(jax.device_get(state.params))
    losses = []
    for s in range(3):
      state, m = fn(state, _batches(mesh, s, 1))
      losses.append(float(m["loss"][0]))
    outs.append((jax.device_get(state), losses))
  (a, la), (b, lb) = outs
  assert int(a.step) == int(b.step) == 3
  np.testing.assert_allclose(lb, la, rtol=1e-6)
  la, lb = (jax.tree_util.tree_leaves((s.params, s.ema_params, s.opt_state)) for s in (a, b))
  assert len(la) == len(lb) > 10
  for x, y in zip(lb, la):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a.params), initial)) > 1e-4


def test_fsdp_meshes_train_alike():
  """3 steps on 8 devices as data x fsdp = 8x1 and 1x8 (PixelModel, every leaf but one
  sharded): fsdp = 1 is the data-parallel program bit for bit; fsdp 8 equals it up to
  reduction order, and its state stays sharded. (The U-Net sharded over 2 processes:
  tests/multiprocess/test_multihost.py.)"""
  rules = parallel.ShardingRules(min_size=512)
  runs = {}
  for name, mesh in [("data", parallel.data_mesh()), *((f, parallel.make_mesh(f)) for f in (1, 8))]:
    fn, state = _setup(mesh, PixelModel, dropout=False, rules=None if name == "data" else rules)
    for s in range(3):
      state, m = fn(state, _batches(mesh, s, 1))
    if name == 8:
      assert state.params["lin"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
      assert state.opt_state[1][0].nu["lin"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
      assert state.params["lin"]["kernel"][...].addressable_shards[0].data.shape == (2, 64)
    runs[name] = (jax.device_get(state), float(m["loss"][0]))
  assert_bitwise_equal(runs["data"][0], runs[1][0])
  base, loss = runs[1]
  for f in (8,):
    other, other_loss = runs[f]
    assert int(other.step) == 3 and other_loss == pytest.approx(loss, rel=1e-6)
    la, lb = (jax.tree_util.tree_leaves((r.params, r.ema_params, r.opt_state)) for r in (base, other))
    assert len(la) == len(lb) == 18
    for x, y in zip(la, lb):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_micro_batches_and_accumulate():
  x = np.arange(12.0).reshape(6, 2)
  parts = train_lib.micro_batches({"x": x, "none": None}, 3)
  assert parts["none"] is None
  for j in range(3):
    np.testing.assert_array_equal(parts["x"][j], x[j::3])
  # the mean over micro-batches of a quadratic's value and gradient: closed form
  w = {"w": jnp.array([1.0, -2.0])}

  def value_and_grad(params, part, j):
    del j
    return jax.value_and_grad(lambda p: jnp.mean((part @ p["w"]) ** 2))(params)

  expect_v = np.mean((x @ np.array([1.0, -2.0])) ** 2)
  expect_g = 2 * x.T @ (x @ np.array([1.0, -2.0])) / len(x)
  for unroll in (True, False):
    v, g = train_lib.accumulate(value_and_grad, w, jnp.asarray(parts["x"]), 3, unroll=unroll)
    np.testing.assert_allclose(float(v), expect_v, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g["w"]), expect_g, rtol=1e-6)


def test_nonfinite_step_is_skipped_and_counted():
  mesh = parallel.data_mesh(jax.devices()[:1])
  fn, state = _setup(mesh, PixelModel)
  state, _ = fn(state, _batches(mesh, 0, 1))
  before = jax.device_get(state)
  state, m = fn(state, _batches(mesh, 1, 1, poison=True))
  after = jax.device_get(state)
  assert not bool(m["finite"][0]) and not np.isfinite(float(m["loss"][0]))
  assert int(after.step) == 2 and int(after.nonfinite) == 1 and int(after.skipped) == 1
  assert_bitwise_equal(before.params, after.params)
  assert_bitwise_equal(before.ema_params, after.ema_params)
  assert_bitwise_equal(before.opt_state, after.opt_state)
  state, m = fn(state, _batches(mesh, 2, 1))
  assert bool(m["finite"][0]) and int(jax.device_get(state.nonfinite)) == 0
  assert int(jax.device_get(state.skipped)) == 1


def test_checkpointer_refuses_nan(tmp_path):
  _, state = _setup(parallel.data_mesh(jax.devices()[:1]), PixelModel)
  bad = state.replace(params=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params))
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  with pytest.raises(ValueError, match="non-finite"):
    ck.save(0, train_lib.checkpoint_items(bad))
  ck.close()
  assert checkpoint.all_steps(str(tmp_path)) == []


@pytest.mark.slow
class _Mixed(nnx.Module):
  """One of each kind of parameter initializer the networks use (conv, linear, embedding,
  GroupNorm scale and bias), small enough to build eagerly in a moment."""

  def __init__(self, rngs):
    from ddx.models.layers import Conv, GroupNorm

    self.conv = Conv(3, 8, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
    self.norm = GroupNorm(8, 4)
    self.lin = nnx.Linear(8, 8, rngs=rngs)
    self.emb = nnx.Embed(5, 8, rngs=rngs)


def test_create_state_equals_eager_init():
  """The jitted construction of a model and its train state gives the eager values to 1 ulp
  (on CPU the program is compiled at LLVM O0, whose arithmetic rounds a few values of the
  random draws' transforms differently; 2e-7 relative measured), and the same structure."""
  tx = train_lib.make_optimizer(train_lib.OptimizerSpec())
  k0, k1 = jax.random.fold_in(jax.random.key(0), 0), jax.random.fold_in(jax.random.key(0), 1)
  g1, jitted = train_lib.create_state(_Mixed, tx, k0, k1)
  g2, eager = train_lib.init_state(_Mixed(nnx.Rngs(params=k0)), tx, k1)
  assert g1 == g2
  la, lb = jax.tree_util.tree_leaves_with_path(jitted), jax.tree_util.tree_leaves(eager)
  assert len(la) == len(lb)
  for (path, a), b in zip(la, lb):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-7, atol=0, err_msg=jax.tree_util.keystr(path))


class _NaNSource:
  """Digits with every image NaN: every step is non-finite."""

  def __init__(self):
    self.base = data.make_source("digits", image_size=8)
    self.image_shape, self.num_classes = self.base.image_shape, self.base.num_classes

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    ex = dict(self.base[i])
    ex["image"] = np.full_like(ex["image"], np.nan)
    return ex


def test_divergence_stops_with_clear_error_and_clean_checkpoints(tmp_path):
  from ddx.training import loop

  with pytest.raises(loop.TrainingDiverged, match="3 consecutive non-finite"):
    loop_run(str(tmp_path), 20, source=_NaNSource(), max_nonfinite=3)
  for step in checkpoint.all_steps(str(tmp_path)):
    _, items = checkpoint.restore(str(tmp_path), step, {"params": None, "ema_params": None, "opt_state": None})
    for leaf in jax.tree_util.tree_leaves((items["params"], items["ema_params"], items["opt_state"])):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


# --- the command line, in-process ------------------------------------------------------------


@pytest.mark.slow
def test_cli_resumes_past_a_half_written_step_and_refuses_a_damaged_one(trained_workdir, tmp_path, ddx_cli):
  wd = trained_workdir(tmp_path / "w")  # 12 steps of the tiny run, checkpoints 8 and 12
  assert checkpoint.all_steps(wd) == [8, 12]
  # an interrupted write leaves orbax's temporary directory: it is not a checkpoint
  tmp = os.path.join(wd, "checkpoints", "16.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(tmp, "params"))
  open(os.path.join(tmp, "params", "garbage"), "w").write("x")
  assert checkpoint.latest_step(wd) == 12
  code, out, err = ddx_cli("train", f"--workdir={wd}", *TRAIN_FLAGS, "--config.train.total_steps=16")
  assert code == 0, err[-2000:]
  assert "resumed from" in out and checkpoint.latest_step(wd) == 16
  # the start-of-run report, and the achieved rate in the log
  assert "mesh {'data': 8, 'fsdp': 1}; state per device: params " in out and "compiled step per device: memory" in out
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert rows[-1]["step"] == 16 and rows[-1]["tflops_per_device"] > 0 and "mfu" not in rows[-1]
  # a committed checkpoint with a damaged file: a one-line error naming the checkpoint
  for f in glob.glob(os.path.join(wd, "checkpoints", "16", "*params", "**", "*"), recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 0:
      open(f, "wb").write(b"\0garbage")
  code, _, err = ddx_cli("sample", f"--workdir={wd}", "--steps=2", "--num=2")
  assert code == 1 and err.count("\n") == 1 and "checkpoint" in err, err[-500:]
  assert "Traceback" not in err


def test_cli_bad_inputs(tmp_path, ddx_cli):
  cases = [
    (["train", f"--workdir={tmp_path}/x", *TRAIN_FLAGS, "--config.optim.learning_rate=-1"], "optim.learning_rate"),
    (["train", f"--workdir={tmp_path}/x", *TRAIN_FLAGS, "--config.optim.nope=1"], "optim.nope"),
    (["train", f"--workdir={tmp_path}/x", *TRAIN_FLAGS, "--config.model.norm_num_groups=3"], "model.norm_num_groups"),
    (["train", f"--workdir={tmp_path}/x", *TRAIN_FLAGS, "--config.train.steps_per_call=3"], "steps_per_call"),
    (["train", f"--workdir={tmp_path}/x", *TRAIN_FLAGS, "--config.train.grad_accum=3"], "train.grad_accum"),
    # 8 / 4 = a micro-batch of 2 over the 8 test devices
    (["train", f"--workdir={tmp_path}/x", *TRAIN_FLAGS, "--config.train.grad_accum=4"], "train.grad_accum: the micro"),
    (["train", f"--workdir={tmp_path}/x", *TRAIN_FLAGS, "--config.diffusion.variance=learned"], "diffusion.variance"),
    (["sample", f"--workdir={tmp_path}/missing"], "workdir does not exist"),
    (["sample", f"--workdir={tmp_path}"], "no config.json"),
  ]
  for args, needle in cases:
    code, _, err = ddx_cli(*args)
    assert code != 0, args
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (args, err[-800:])
  assert not os.path.exists(f"{tmp_path}/x/checkpoints")


def test_a_second_trainer_on_a_workdir_is_refused(tmp_path, ddx_cli):
  """While a run holds the workdir (its lock is taken here as a running trainer takes it), a
  second ``ddx train`` on it stops with one line naming the holder and writes nothing."""
  wd = str(tmp_path / "wd")
  held = workdir_lock.WorkdirLock(wd)
  held.acquire()
  try:
    code, _, err = ddx_cli("train", f"--workdir={wd}", *TRAIN_FLAGS, "--config.train.total_steps=2")
  finally:
    held.release()
  assert code == 1 and err.count("\n") == 1, err[-800:]
  assert err.startswith(f"ddx train: error: workdir {wd}: another training run is using it (pid {os.getpid()} on host")
  assert os.listdir(wd) == [workdir_lock.LOCK_NAME]
  again = workdir_lock.WorkdirLock(wd)  # released: the next run takes it
  again.acquire()
  again.release()


def test_info_plans_a_sharded_run_without_training(ddx_cli):
  """``ddx info --config`` compiles the step for abstract inputs and prints the per-device
  state at fsdp 8, beside the unsharded one."""
  code, out, err = ddx_cli(
    "info",
    *TRAIN_FLAGS,
    "--config.parallel.fsdp=8",
    "--config.parallel.fsdp_min_size=64",
    "--config.parallel.peak_tflops=2.0",
  )
  assert code == 0, err[-800:]
  assert "mesh {'data': 1, 'fsdp': 8}; state per device:" in out and "2 TFLOP/s peak" in out
  per, whole = (float(v) for v in re.search(r"= ([\d.e-]+) MiB \(unsharded ([\d.e-]+) MiB", out).groups())
  assert per < whole / 4, (per, whole)
  assert re.search(r"compiled step per device: memory [\d.]+ MiB \(temporaries [\d.]+ MiB\), [\d.e-]+ GFLOP", out)
