"""Nothing silently wrong: checksummed checkpoints (restore, resume fallback, ``verify``),
non-finite samples refused, every numeric flag range-checked, damaged safetensors named."""

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ddx
from ddx import checkpoint, cli, loop, parallel, service
from ddx import train as train_lib
from ddx.models import UNet, convert, unet_kwargs
from ddx.models.unet import abstract_unet
from ddx.models.convert import unet_from_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
            norm_num_groups=4)
DIFFUSION = convert.diffusers_scheduler_to_diffusion(None)


def _env():
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _ddx(args, timeout=600):
  return subprocess.run([sys.executable, "-m", "ddx", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _last_line(p) -> str:
  return (p.stderr.strip().splitlines() or [""])[-1]


def _random_unet(seed):
  """A tiny UNet with random weights everywhere (built from numpy: no per-initializer compiles)."""
  kwargs = unet_kwargs(**TINY)
  shapes = nnx.to_pure_dict(nnx.state(abstract_unet(**kwargs), nnx.Param))
  rng = np.random.RandomState(seed)
  return unet_from_params(kwargs, jax.tree.map(lambda s: (0.2 * rng.randn(*s.shape)).astype(np.float32), shapes))


@pytest.fixture(scope="module")
def tiny():
  return _random_unet(0)


def _config(model):
  return {"model": model.kwargs, "diffusion": DIFFUSION}


def _data_files(workdir, step, item):
  """The array data files of one item of a step (orbax OCDBT), largest last."""
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), item, "ocdbt.process_0", "d", "*"))
  assert files, os.listdir(os.path.join(workdir, "checkpoints", str(step), item))
  return sorted(files, key=os.path.getsize)


def _flip(fname, mask, n=32, at=0.5):
  """XOR ``n`` bytes of a file, from the fraction ``at`` of its length, with ``mask`` (in place)."""
  data = bytearray(open(fname, "rb").read())
  start = int(len(data) * at)
  for i in range(start, start + n):
    data[i] ^= mask
  open(fname, "wb").write(bytes(data))


def _flip_keeping_finite(workdir, step, item):
  """Flip the lowest bit of 8 bytes of the item's largest data file where the result still
  decodes to finite values that differ from the saved ones (orbax compresses chunks with zstd;
  a flip inside a compressed block can also garble a whole chunk). Returns the changed leaves."""
  fname = _data_files(workdir, step, item)[-1]
  pristine = open(fname, "rb").read()
  before = _raw(workdir, step, item)
  for at in (0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2, 0.9):
    _flip(fname, mask=0x01, n=8, at=at)
    try:
      after = _raw(workdir, step, item)
    except Exception:  # pylint: disable=broad-except  (undecodable: try elsewhere)
      after = None
    if after is not None and all(np.all(np.isfinite(v)) for v in after.values()) and _changed(before, after):
      return _changed(before, after)
    open(fname, "wb").write(pristine)
  raise AssertionError("no value-changing, finite corruption found")


def _raw(workdir, step, item):
  """{"a/b/kernel": array} read straight through orbax: no checksums involved."""
  mngr = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir))
  try:
    tree = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))[item]
  finally:
    mngr.close()
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v) for path, v in flat}


def _files(directory):
  """{relative path: bytes} of every file under ``directory``."""
  out = {}
  for root, _, names in os.walk(directory):
    for n in names:
      out[os.path.relpath(os.path.join(root, n), directory)] = open(os.path.join(root, n), "rb").read()
  return out


def _changed(before, after):
  assert before.keys() == after.keys()
  return sorted(k for k in before if not np.array_equal(before[k], after[k], equal_nan=True))


def _verify(workdir, capsys, *flags):
  code = cli.main(["ddx", "verify", f"--workdir={workdir}", *flags])
  return code, capsys.readouterr().out


# --- checksums at the checkpoint boundary -------------------------------------------------


def test_value_changing_corruption_is_caught_by_the_checksums(tiny, tmp_path, capsys):
  wd = str(tmp_path)
  for step in (1, 2):
    checkpoint.save(wd, step, {"params": tiny, "ema_params": tiny}, _config(tiny))
  # the damage decodes: orbax reads ordinary finite floats, a few of them different
  bad = _flip_keeping_finite(wd, 2, "ema_params")
  with pytest.raises(checkpoint.CorruptCheckpointError) as e:
    service.load_model(wd)
  msg = str(e.value)
  assert "\n" not in msg and e.value.step == 2
  assert msg.startswith(f"corrupt checkpoint {wd}/checkpoints/2: step 2: ema_params/{bad[0]} does not match"), msg
  # the other item of that step and the older step are intact and load
  service.load_model(wd, which="params")
  assert service.load_model(wd, step=1)[2] == 1
  code, out = _verify(wd, capsys)
  lines = out.splitlines()
  assert code == 1 and lines[0].startswith("step 1: ok: ") and lines[1].startswith("step 2: BAD: "), out
  assert f"ema_params/{bad[0]}" in lines[1] and "1 ok, 1 bad" in lines[-1]
  code, out = _verify(wd, capsys, "--step=1")
  assert code == 0 and out.startswith("step 1: ok")


def test_undecodable_and_truncated_data_name_step_and_leaf(tiny, tmp_path, capsys):
  wd = str(tmp_path)
  checkpoint.save(wd, 3, {"params": tiny, "ema_params": tiny}, _config(tiny))
  before = _raw(wd, 3, "params")
  big = _data_files(wd, 3, "params")[-1]
  _flip(big, mask=0xFF, n=256)  # every bit of 256 bytes: sign, exponent and mantissa
  bad = _changed(before, _raw(wd, 3, "params"))
  with pytest.raises(checkpoint.CorruptCheckpointError, match=f"step 3: params/{bad[0]} does not match") as e:
    service.load_model(wd, which="params")
  assert "\n" not in str(e.value)
  # truncated: tensorstore cannot read the chunk; the error still names the step and the leaf
  data = open(big, "rb").read()
  open(big, "wb").write(data[: len(data) // 3])
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match=rf"^corrupt or incomplete checkpoint {wd}/checkpoints/3: step 3: params/\S+ cannot be read: "):
    service.load_model(wd, which="params")
  code, out = _verify(wd, capsys)
  assert code == 1 and out.startswith("step 3: BAD: corrupt or incomplete checkpoint"), out
  # a deleted checksums item is damage too, not an old-format step
  shutil.rmtree(os.path.join(wd, "checkpoints", "3", checkpoint.CHECKSUMS_ITEM))
  with pytest.raises(checkpoint.CorruptCheckpointError, match="step 3: its checksums item is missing"):
    service.load_model(wd)


def test_old_format_checkpoint_restores_with_one_warning(tiny, tmp_path, caplog, capsys):
  wd = str(tmp_path)
  params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
  # what ddx wrote before checksums existed: a Composite of StandardSave items, nothing else
  mngr = ocp.CheckpointManager(checkpoint.checkpoint_dir(wd), options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(params), ema_params=ocp.args.StandardSave(params)))
  mngr.wait_until_finished()
  mngr.close()
  checkpoint.write_config(wd, _config(tiny))
  with caplog.at_level(logging.WARNING, logger="ddx.checkpoint"):
    model, _, step = service.load_model(wd)
  assert step == 7
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)
  notes = [r.getMessage() for r in caplog.records if r.name == "ddx.checkpoint"]
  assert len(notes) == 1 and "\n" not in notes[0], notes
  assert notes[0] == f"checkpoint {wd}/checkpoints/7 (step 7) has no checksums (written before ddx recorded them): " \
                     "loaded unverified"
  code, out = _verify(wd, capsys)
  assert code == 0 and out.startswith("step 7: unverified: no checksums"), out
  # a new step written next to it has checksums; the old one is untouched
  checkpoint.save(wd, 8, {"params": tiny, "ema_params": tiny})
  code, out = _verify(wd, capsys)
  assert code == 0 and "step 8: ok" in out and "1 ok, 0 bad, 1 without checksums" in out, out


def test_checkpointer_writes_and_checks_checksums(tmp_path):
  import optax  # pylint: disable=import-outside-toplevel
  model = _random_unet(1)
  tx = optax.adam(1e-3)
  _, state = train_lib.init_state(model, tx, jax.random.key(0))
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  ck.save(4, train_lib.checkpoint_items(state))
  ck.wait()
  items = ck.restore(4, train_lib.checkpoint_targets(state))  # the leaves of every item match
  assert items["train"]["step"] == 0
  record = json.load(open(os.path.join(str(tmp_path), "checkpoints", "4", "checksums", "metadata")))
  names = set(record["leaves"])
  assert {"train", "params/conv_in/kernel", "ema_params/conv_in/kernel"} <= names
  assert any(n.startswith("opt_state/") for n in names)
  bad = _flip_keeping_finite(str(tmp_path), 4, "params")
  with pytest.raises(checkpoint.CorruptCheckpointError, match=f": step 4: params/{bad[0]} does not match"):
    ck.restore(4, train_lib.checkpoint_targets(state))
  ck.close()
  with pytest.raises(ValueError, match="'checksums' is reserved"):
    checkpoint.save(str(tmp_path), 5, {"params": model, "checksums": {}}, _config(model))


class _PixelModel(nnx.Module):
  """eps(x, t) from each pixel and t alone: a real trainable model that compiles in a moment
  (the loop and the checkpoints do not depend on the architecture)."""

  def __init__(self, rngs):
    # 512 wide: arrays above orbax's 1 KiB inline limit land in the data files the tests damage
    self.lin = nnx.Linear(2, 512, rngs=rngs)
    self.out = nnx.Linear(512, 1, rngs=rngs)

  def __call__(self, x, t, y=None, dropout_key=None):
    tt = jnp.broadcast_to((t.astype(x.dtype) / 1000.0)[:, None, None, None], x.shape)
    return self.out(jax.nn.silu(self.lin(jnp.stack([x, tt], -1))))[..., 0]


def _train(workdir, total_steps, *, stop_after_steps=None, num_classes=None, sample=None, sample_every=0):
  spec = loop.LoopSpec(seed=0, global_batch_size=8, total_steps=total_steps, checkpoint_every=2, keep_checkpoints=2,
                       sample_every=sample_every, log_every_seconds=100.0)
  return loop.run(workdir, {"model": {"pixel": 512}, "diffusion": DIFFUSION}, model_factory=_PixelModel,
                  num_classes=num_classes, use_dropout=False, source=ddx.data.make_source("digits", image_size=8),
                  sched=ddx.schedules.make("linear", 1000), optim=train_lib.OptimizerSpec(learning_rate=1e-2,
                                                                                          warmup_steps=1),
                  loss=train_lib.LossSpec(), loop=spec, sample=sample or loop.SampleSpec(),
                  mesh=parallel.data_mesh(jax.devices()[:1]), stop_after_steps=stop_after_steps)


def test_train_resumes_from_the_newest_step_that_verifies(tmp_path, capsys):
  wd = str(tmp_path)
  _train(wd, 6, stop_after_steps=4)  # checkpoint_every=2, keep_checkpoints=2
  assert checkpoint.all_steps(wd) == [2, 4]
  good4 = _raw(wd, 4, "params")
  bad = _flip_keeping_finite(wd, 4, "params")
  damaged = _files(os.path.join(wd, "checkpoints", "4"))
  capsys.readouterr()
  _train(wd, 6)
  out = capsys.readouterr().out
  aside = os.path.join(wd, checkpoint.CORRUPT_SUBDIR, "4")
  assert f"checkpoint step 4 does not verify: corrupt checkpoint {wd}/checkpoints/4: step 4: params/{bad[0]}" in out
  assert (f"resumed from {wd}/checkpoints/2, the newest checkpoint that verifies (step 4 failed verification; "
          f"moved to {aside}, not deleted)") in out, out
  # Had step 4 stayed in checkpoints/, saving step 4 again would fail (orbax refuses to
  # overwrite a step) and max_to_keep=2 would count it. Set aside, it is kept byte for byte;
  # steps 4 and 6 are written anew and max_to_keep rotates out step 2 only after they exist.
  assert _files(aside) == damaged
  assert checkpoint.all_steps(wd) == [4, 6]
  # the retrained step 4 is bitwise the step 4 that was damaged: the resume from 2 is exact
  assert _changed(good4, _raw(wd, 4, "params")) == []
  code, out = _verify(wd, capsys)
  assert code == 0 and "2 ok, 0 bad" in out and f"{aside}: set aside by train" in out, out
  # when no step verifies, nothing is moved and the run stops with one line
  for step in (4, 6):
    _flip_keeping_finite(wd, step, "ema_params")
  with pytest.raises(checkpoint.CorruptCheckpointError) as e:
    _train(wd, 8)
  assert str(e.value) == (f"no checkpoint in {wd}/checkpoints verifies (steps 6, 4; see `python -m ddx verify`); "
                          "move them away to start over")
  assert checkpoint.all_steps(wd) == [4, 6] and os.listdir(os.path.join(wd, checkpoint.CORRUPT_SUBDIR)) == ["4"]


# --- non-finite outputs ---------------------------------------------------------------------


def test_sample_refuses_a_model_that_outputs_nan(tmp_path):
  wd = str(tmp_path / "nan")
  nan = _random_unet(2)
  params = jax.tree.map(lambda p: np.full(p.shape, np.nan, np.float32), nnx.to_pure_dict(nnx.state(nan, nnx.Param)))
  # checkpoint.save (unlike the training Checkpointer) stores NaN as given
  checkpoint.save(wd, 1, {"params": params, "ema_params": params}, _config(nan))
  p = _ddx(["sample", f"--workdir={wd}", "--steps=2", "--num=2", "--out=" + str(tmp_path / "out" / "s")])
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert _last_line(p) == ("ddx sample: error: samples: 384 of 384 values are not finite (checkpoint step 1, "
                           "ema_params); nothing written"), p.stderr[-1000:]
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(os.path.join(wd, "samples"))


def test_images_refuse_non_finite_samples(tmp_path):
  from ddx import images  # pylint: disable=import-outside-toplevel
  x = np.zeros((2, 4, 4, 1), np.float32)
  x[1, 2, 3, 0] = np.inf
  with pytest.raises(ValueError, match=r"^samples: 1 of 32 values are not finite; nothing written"):
    images.save_samples(str(tmp_path / "s"), x)
  assert os.listdir(tmp_path) == []


def test_training_sample_grids_skip_non_finite_samples_and_training_goes_on(tmp_path, capsys):
  wd = str(tmp_path)
  # an infinite classifier-free guidance scale (which the config would reject) makes the samples NaN
  sample = loop.SampleSpec(sampler="ddim", steps=2, num=4, guidance=float("inf"),
                           sampler_kwargs={"prediction": "eps", "clip_sample": False})
  summary = _train(wd, 4, num_classes=10, sample=sample, sample_every=2)
  out = capsys.readouterr().out
  assert summary["step"] == 4 and checkpoint.all_steps(wd) == [2, 4]
  for step in (2, 4):
    assert re.search(f"warning: sample grid at step {step}: [0-9]+ of 256 values are not finite; nothing written, "
                     "training goes on", out), out
  assert not os.path.exists(os.path.join(wd, "samples"))
