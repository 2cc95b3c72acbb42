"""Nothing silently wrong: checksummed checkpoints (restore, resume fallback, ``verify``),
non-finite samples refused, every numeric flag range-checked, damaged safetensors named."""

import glob
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ddx.cli import main as cli
from ddx.cli import restore
from ddx.models import UNetConfig, abstract, param_shapes, with_params
from ddx.models.io import diffusers as convert
from ddx.training import checkpoint, loop
from ddx.training import step as train_lib
from tests._tiny import DIFFUSION, loop_run, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(
  image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), norm_num_groups=4
)


def _env():
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=xla_flags(1),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
  )
  return env


def _ddx(args, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "ddx", *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
  )


def _last_line(p) -> str:
  return (p.stderr.strip().splitlines() or [""])[-1]


def _random_unet(seed, **changes):
  """A tiny UNet with random weights everywhere (built from numpy: no per-initializer compiles)."""
  module = abstract(UNetConfig(**{**TINY, **changes}))
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda s: (0.2 * rng.randn(*s.shape)).astype(np.float32), param_shapes(module))
  return with_params(module, params)


@pytest.fixture(scope="module")
def tiny():
  return _random_unet(0)


def _config(model):
  return {"model": model.config.to_json(), "diffusion": DIFFUSION}


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
    except Exception:  # (undecodable: try elsewhere)
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
    restore.load_model(wd)
  msg = str(e.value)
  assert "\n" not in msg and e.value.step == 2
  assert msg.startswith(f"corrupt checkpoint {wd}/checkpoints/2: step 2: ema_params/{bad[0]} does not match"), msg
  # the other item of that step and the older step are intact and load
  restore.load_model(wd, which="params")
  assert restore.load_model(wd, step=1)[2] == 1
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
  # every bit of 256 bytes: sign, exponent and mantissa; where they still decode (orbax
  # compresses chunks with zstd, and the file's layout varies from save to save: a flip
  # inside a compressed block garbles the chunk, which is the truncation case below)
  pristine, bad = open(big, "rb").read(), None
  for at in (0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2, 0.9):
    _flip(big, mask=0xFF, n=256, at=at)
    try:
      bad = _changed(before, _raw(wd, 3, "params"))
    except Exception:  # undecodable: try elsewhere
      bad = None
    if bad:
      break
    open(big, "wb").write(pristine)
  assert bad, "no decodable value-changing flip found"
  with pytest.raises(checkpoint.CorruptCheckpointError, match=f"step 3: params/{bad[0]} does not match") as e:
    restore.load_model(wd, which="params")
  assert "\n" not in str(e.value)
  # truncated: tensorstore cannot read the chunk; the error still names the step and the leaf
  data = open(big, "rb").read()
  open(big, "wb").write(data[: len(data) // 3])
  with pytest.raises(
    checkpoint.CorruptCheckpointError,
    match=rf"^corrupt or incomplete checkpoint {wd}/checkpoints/3: step 3: params/\S+ cannot be read: ",
  ):
    restore.load_model(wd, which="params")
  code, out = _verify(wd, capsys)
  assert code == 1 and out.startswith("step 3: BAD: corrupt or incomplete checkpoint"), out
  # a deleted checksums item is damage too, not an old-format step
  shutil.rmtree(os.path.join(wd, "checkpoints", "3", checkpoint.CHECKSUMS_ITEM))
  with pytest.raises(checkpoint.CorruptCheckpointError, match="step 3: its checksums item is missing"):
    restore.load_model(wd)


def test_old_format_checkpoint_restores_with_one_warning(tiny, tmp_path, caplog, capsys):
  wd = str(tmp_path)
  params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
  # what ddx wrote before checksums existed: a Composite of StandardSave items, nothing else
  mngr = ocp.CheckpointManager(checkpoint.checkpoint_dir(wd), options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(params), ema_params=ocp.args.StandardSave(params)))
  mngr.wait_until_finished()
  mngr.close()
  checkpoint.write_config(wd, _config(tiny))
  with caplog.at_level(logging.WARNING, logger="ddx.training.checkpoint"):
    model, _, step = restore.load_model(wd)
  assert step == 7
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)
  notes = [r.getMessage() for r in caplog.records if r.name == "ddx.training.checkpoint"]
  assert len(notes) == 1 and "\n" not in notes[0], notes
  assert (
    notes[0] == f"checkpoint {wd}/checkpoints/7 (step 7) has no checksums (written before ddx recorded them): "
    "loaded unverified"
  )
  code, out = _verify(wd, capsys)
  assert code == 0 and out.startswith("step 7: unverified: no checksums"), out
  # on the command line the note is one line of the command's stderr
  logger = logging.getLogger("ddx")
  handlers, propagate = list(logger.handlers), logger.propagate
  try:
    cli._one_line_warnings("ddx sample")  # (what cli.run sets up)
    restore.load_model(wd)
    err = capsys.readouterr().err
  finally:
    logger.handlers[:], logger.propagate = handlers, propagate
  assert err == (
    f"ddx sample: warning: checkpoint {wd}/checkpoints/7 (step 7) has no checksums (written before ddx "
    "recorded them): loaded unverified\n"
  ), err
  # a new step written next to it has checksums; the old one is untouched
  checkpoint.save(wd, 8, {"params": tiny, "ema_params": tiny})
  code, out = _verify(wd, capsys)
  assert code == 0 and "step 8: ok" in out and "1 ok, 0 bad, 1 without checksums" in out, out


@pytest.mark.slow
def test_checkpointer_writes_and_checks_checksums(tmp_path, caplog):
  import optax

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
  # a training step written before checksums existed resumes, with one warning
  plain = ocp.CheckpointManager(checkpoint.checkpoint_dir(str(tmp_path)))
  saved = train_lib.checkpoint_items(state)
  plain.save(
    6,
    args=ocp.args.Composite(
      train=ocp.args.JsonSave({**saved["train"], "step": 6}),
      **{
        k: ocp.args.StandardSave(nnx.to_pure_dict(v) if isinstance(v, nnx.State) else v)
        for k, v in saved.items()
        if k != "train"
      },
    ),
  )
  plain.wait_until_finished()
  plain.close()
  ck.reload()
  with caplog.at_level(logging.WARNING, logger="ddx.training.checkpoint"):
    items = ck.restore(6, train_lib.checkpoint_targets(state))
  assert items["train"]["step"] == 6
  assert [r.getMessage() for r in caplog.records if r.name == "ddx.training.checkpoint"] == [
    f"checkpoint {tmp_path}/checkpoints/6 (step 6) has no checksums (written before ddx recorded them): "
    "loaded unverified"
  ]
  ck.close()
  with pytest.raises(ValueError, match="'checksums' is reserved"):
    checkpoint.save(str(tmp_path), 5, {"params": model, "checksums": {}}, _config(model))


def _train(workdir, total_steps, **kw):
  return loop_run(workdir, total_steps, **kw)


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
  assert (
    f"resumed from {wd}/checkpoints/2, the newest checkpoint that verifies (step 4 failed verification; "
    f"moved to {aside}, not deleted)"
  ) in out, out
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
  assert str(e.value) == (
    f"no checkpoint in {wd}/checkpoints verifies (steps 6, 4; see `python -m ddx verify`); move them away to start over"
  )
  assert checkpoint.all_steps(wd) == [4, 6] and os.listdir(os.path.join(wd, checkpoint.CORRUPT_SUBDIR)) == ["4"]


# --- non-finite outputs ---------------------------------------------------------------------


@pytest.mark.slow
def test_sample_refuses_a_model_that_outputs_nan(tmp_path):
  wd = str(tmp_path / "nan")
  nan = _random_unet(2)
  params = jax.tree.map(lambda p: np.full(p.shape, np.nan, np.float32), nnx.to_pure_dict(nnx.state(nan, nnx.Param)))
  # checkpoint.save (unlike the training Checkpointer) stores NaN as given
  checkpoint.save(wd, 1, {"params": params, "ema_params": params}, _config(nan))
  p = _ddx(["sample", f"--workdir={wd}", "--steps=2", "--num=2", "--out=" + str(tmp_path / "out" / "s")])
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert _last_line(p) == (
    "ddx sample: error: samples: 384 of 384 values are not finite (checkpoint step 1, ema_params); nothing written"
  ), p.stderr[-1000:]
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(os.path.join(wd, "samples"))


@pytest.mark.slow
@pytest.mark.torch
def test_txt2img_refuses_non_finite_images(sd_folder, tmp_path):
  from safetensors.numpy import load_file, save_file

  path = str(tmp_path / "pipe")
  shutil.copytree(sd_folder[0], path)
  vae = os.path.join(path, "vae", "diffusion_pytorch_model.safetensors")
  state = load_file(vae)
  # finite weights (the importer refuses NaN and inf) that overflow: the decoder's first
  # activations are inf, its next group norm makes them NaN (inf - inf)
  state["decoder.conv_in.weight"] = np.full_like(state["decoder.conv_in.weight"], 3e38)
  save_file(state, vae)
  out = tmp_path / "out"
  argv = ["ddx", "txt2img", f"--pipeline={path}", "--prompt=a cat", "--sampler=ddim", "--steps=1", f"--out={out}/t"]
  # the ranges that depend on the pipeline are checked once it is read, before anything compiles
  for extra, msg in [
    (["--steps=1001"], "--steps: must be <= 1000 (the pipeline scheduler's num_train_timesteps), got 1001"),
    (["--height=6"], "--height: must be a positive multiple of 4, got 6"),
  ]:
    with pytest.raises(ValueError) as e:
      cli.main(argv + extra)
    assert str(e.value) == msg
  # the images (16 x 16 x 3) are NaN: one line, nothing written
  with pytest.raises(ValueError) as e:
    cli.main(argv)
  assert str(e.value) == f"samples: 768 of 768 values are not finite (pipeline {path}); nothing written"
  assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_images_refuse_non_finite_samples(tmp_path):
  from ddx import images

  x = np.zeros((2, 4, 4, 1), np.float32)
  x[1, 2, 3, 0] = np.inf
  with pytest.raises(ValueError, match=r"^samples: 1 of 32 values are not finite; nothing written"):
    images.save_samples(str(tmp_path / "s"), x)
  assert os.listdir(tmp_path) == []


def test_training_sample_grids_skip_non_finite_samples_and_training_goes_on(tmp_path, capsys):
  wd = str(tmp_path)
  # an infinite classifier-free guidance scale (which the config would reject) makes the samples NaN
  sample = loop.SampleSpec(
    sampler="ddim", steps=2, num=4, guidance=float("inf"), sampler_kwargs={"prediction": "eps", "clip_sample": False}
  )
  summary = _train(wd, 4, num_classes=10, sample=sample, sample_every=2)
  out = capsys.readouterr().out
  assert summary["step"] == 4 and checkpoint.all_steps(wd) == [2, 4]
  for step in (2, 4):
    assert re.search(
      f"warning: sample grid at step {step}: [0-9]+ of 256 values are not finite; nothing written, training goes on",
      out,
    ), out
  assert not os.path.exists(os.path.join(wd, "samples"))


# --- every numeric flag of every command: its own range, 0 included -----------------------

BIG = 10**9
MAX_SEED = 2**63 - 1
NO_STEP_0 = "no checkpoint for step 0 in"


def _model_flag_cases(command, tail):
  """The flags every editing command shares (define_model_flags): the workdir's model is
  class-conditional with 10 classes, T = 1000, a checkpoint at step 1. ``tail``: the error
  that shows --label=0 and --seed=0 passed."""
  return [
    (["--seed=-1"], "--seed: must be >= 0, got -1"),
    ([f"--seed={2**63}"], f"--seed: must be <= {MAX_SEED}, got {2**63}"),
    (["--label=-1"], "--label: must be >= 0, got -1"),
    (["--label=11"], "--label: must be in [0, 10] (10 = unconditional), got 11"),
    ([f"--label={BIG}"], f"--label: must be in [0, 10] (10 = unconditional), got {BIG}"),
    (["--checkpoint_step=-1"], "--checkpoint_step: must be >= 0, got -1"),
    ([f"--checkpoint_step={2**31}"], f"--checkpoint_step: must be <= {2**31 - 1}, got {2**31}"),
    (["--checkpoint_step=0"], NO_STEP_0),
    (["--out="], "--out: must be a non-empty path prefix"),
    (["--label=0", "--seed=0"], tail),
  ]


def _steps_cases():
  return [
    (["--steps=0"], "--steps: must be >= 1, got 0"),
    (["--steps=-3"], "--steps: must be >= 1, got -3"),
    (["--steps=1001"], "--steps: must be <= 1000 (the model's diffusion.num_timesteps), got 1001"),
    ([f"--steps={BIG}"], f"--steps: must be <= 100000, got {BIG}"),
  ]


def _eta_cases(sampler=None):
  cases = [
    (["--eta=-0.5"], "--eta: must be >= 0.0, got -0.5"),
    (["--eta=1e30"], "--eta: must be <= 1.0, got 1e+30"),
    (["--eta=nan"], "--eta: must be a finite number, got nan"),
    (["--eta=-inf"], "--eta: must be a finite number, got -inf"),
  ]
  if sampler:  # a non-zero eta is DDIM's alone: another sampler would ignore it
    cases.append(
      (
        ["--eta=0.5", f"--sampler={sampler}"],
        f"--eta: only the ddim sampler takes eta > 0, got 0.5 with sampler {sampler}",
      )
    )
  return cases


def _num_cases(lo, hi):
  return [
    (["--num=0"], f"--num: must be >= {lo}, got 0"),
    (["--num=-1"], f"--num: must be >= {lo}, got -1"),
    ([f"--num={BIG}"], f"--num: must be <= {hi}, got {BIG}"),
  ]


# command -> [(flags, the one-line error)]; a flag's value 0 is checked like any other value.
# Every numeric flag of every command needs a case with 0, a negative and an absurd value (and
# a non-finite one for floats): see test_every_numeric_flag_is_covered. Where 0 is in range,
# its case ends with the error of a flag checked later, which shows that 0 passed.
FLAG_CASES = {
  "sample": [
    *_steps_cases(),
    *_num_cases(1, 1048576),
    *_eta_cases("ddpm"),
    (["--eta=1.5"], "--eta: must be <= 1.0, got 1.5"),
    (["--sigmas=polyexponential"], "--sigmas: must be one of ('karras', 'exponential', 'beta'), got 'polyexponential'"),
    (["--sigmas=karras", "--sampler=ddim"], "--sigmas: only the samplers ('dpm_solver++',"),
    (["--guidance_rescale=-0.5"], "--guidance_rescale: must be >= 0.0, got -0.5"),
    (["--guidance_rescale=1e30"], "--guidance_rescale: must be <= 1.0, got 1e+30"),
    (["--guidance_rescale=nan"], "--guidance_rescale: must be a finite number, got nan"),
    (["--guidance_rescale=0.5"], "--guidance_rescale: only applies with classifier-free guidance (--guidance != 1)"),
    (["--guidance_interval=1"], "--guidance_interval: expected LO,HI (two numbers), got '1'"),
    (["--guidance_interval=3,1", "--guidance=2"], "--guidance_interval: needs 0 <= LO < HI"),
    (["--guidance_interval=0.5,inf"], "--guidance_interval: only applies with classifier-free guidance"),
    (["--guidance=-1"], "--guidance: must be >= 0.0, got -1.0"),
    (["--guidance=1e30"], "--guidance: must be <= 100.0, got 1e+30"),
    (["--guidance=nan"], "--guidance: must be a finite number, got nan"),
    (["--label=-1"], "--label: must be >= 0, got -1"),
    (["--label=11"], "--label: must be in [0, 10] (10 = unconditional), got 11"),
    ([f"--label={BIG}"], f"--label: must be in [0, 10] (10 = unconditional), got {BIG}"),
    (["--seed=-1"], "--seed: must be >= 0, got -1"),
    ([f"--seed={2**63}"], f"--seed: must be <= {MAX_SEED}, got {2**63}"),
    (["--checkpoint_step=-1"], "--checkpoint_step: must be >= 0, got -1"),
    ([f"--checkpoint_step={2**31}"], f"--checkpoint_step: must be <= {2**31 - 1}, got {2**31}"),
    (["--checkpoint_step=0"], NO_STEP_0),
    (["--num_processes=0"], "--num_processes: must be >= 1, got 0"),
    (["--num_processes=-2"], "--num_processes: must be >= 1, got -2"),
    ([f"--num_processes={BIG}"], f"--num_processes: must be <= 65536, got {BIG}"),
    (["--process_id=-1"], "--process_id: must be >= 0, got -1"),
    ([f"--process_id={BIG}"], f"--process_id: must be <= 65535, got {BIG}"),
    (["--num_processes=2", "--process_id=2"], "--process_id: must be <= 1, got 2"),
    # 0 is in range for these: the next flag's error shows they passed
    (
      [
        "--eta=0",
        "--guidance=0",
        "--guidance_rescale=0",
        "--seed=0",
        "--label=0",
        "--checkpoint_step=0",
        "--process_id=0",
        "--sampler=k1",
      ],
      "--sampler: must be one of",
    ),
  ],
  "train": [
    (["--config.parallel.fsdp=3"], "parallel.fsdp: must be a positive divisor of the 8 devices, got 3"),
    (["--config.parallel.fsdp_min_size=-1"], "parallel.fsdp_min_size: must be >= 0, got -1"),
    (["--config.parallel.fsdp_overrides=('x',)"], "parallel.fsdp_overrides: entries are 'REGEX=DIM'"),
    (["--config.parallel.peak_tflops=0.0"], "parallel.peak_tflops: must be > 0, got 0.0"),
    (["--stop_after_steps=0"], "--stop_after_steps: must be >= 1, got 0"),
    (["--stop_after_steps=-2"], "--stop_after_steps: must be >= 1, got -2"),
    ([f"--stop_after_steps={2**31}"], f"--stop_after_steps: must be <= {2**31 - 1}, got {2**31}"),
    (["--num_processes=0"], "--num_processes: must be >= 1, got 0"),
    (["--num_processes=-1"], "--num_processes: must be >= 1, got -1"),
    ([f"--num_processes={BIG}"], f"--num_processes: must be <= 65536, got {BIG}"),
    (["--process_id=-1"], "--process_id: must be >= 0, got -1"),
    ([f"--process_id={BIG}"], f"--process_id: must be <= 65535, got {BIG}"),
    (["--process_id=0", "--config.train.total_steps=0"], "train.total_steps: must be >= 1, got 0"),
    ([f"--config.train.total_steps={2**31}"], f"train.total_steps: must be <= {2**31 - 1}, got {2**31}"),
    (["--config.sample.num=0"], "sample.num: must be >= 1, got 0"),
    ([f"--config.sample.num={BIG}"], f"sample.num: must be <= 1048576, got {BIG}"),
    (["--config.sample.steps=0"], "sample.steps: must be >= 1, got 0"),
    (["--config.sample.eta=2.0"], "sample.eta: must be <= 1.0, got 2.0"),
    (["--config.sample.guidance=1e30"], "sample.guidance: must be <= 100.0, got 1e+30"),
    (["--config.sample.guidance=-1.0"], "sample.guidance: must be >= 0.0, got -1.0"),
    (["--config.optim.learning_rate=0.0"], "optim.learning_rate: must be > 0, got 0.0"),
    (["--config.optim.learning_rate=nan"], "optim.learning_rate: must be a finite number, got nan"),
    (["--config.optim.grad_clip=inf"], "optim.grad_clip: must be a finite number, got inf"),
    (["--config.train.global_batch_size=0"], "train.global_batch_size: must be >= 1, got 0"),
    ([f"--config.train.global_batch_size={BIG}"], f"train.global_batch_size: must be <= 1048576, got {BIG}"),
    (["--config.train.checkpoint_every=0"], "train.checkpoint_every: must be >= 1, got 0"),
    (["--config.seed=-1"], "seed: must be >= 0, got -1"),
    ([f"--config.diffusion.num_timesteps={BIG}"], f"diffusion.num_timesteps: must be <= 100000, got {BIG}"),
    ([f"--config.data.image_size={BIG}"], f"data.image_size: must be <= 4096, got {BIG}"),
    # the model section: every number within what a U-Net can be built with
    ([f"--config.model.image_size={BIG}"], f"model.image_size: must be <= 4096, got {BIG}"),
    (["--config.model.in_channels=0"], "model.in_channels: must be >= 1, got 0"),
    ([f"--config.model.in_channels={BIG}"], f"model.in_channels: must be <= 16384, got {BIG}"),
    (["--config.model.out_channels=0"], "model.out_channels: must be >= 1, got 0"),
    (["--config.model.base_channels=0"], "model.base_channels: must be >= 1, got 0"),
    (["--config.model.base_channels=-8"], "model.base_channels: must be >= 1, got -8"),
    ([f"--config.model.base_channels={BIG}"], f"model.base_channels: must be <= 16384, got {BIG}"),
    (["--config.model.channel_mult=(1,0)"], "model.channel_mult[1]: must be >= 1, got 0"),
    (["--config.model.channel_mult=(1,2,1000)"], "model.channel_mult[2]: must be <= 64, got 1000"),
    (["--config.model.num_res_blocks=0"], "model.num_res_blocks: must be >= 1, got 0"),
    ([f"--config.model.num_res_blocks={BIG}"], f"model.num_res_blocks: must be <= 64, got {BIG}"),
    (["--config.model.attention_resolutions=(8,-1)"], "model.attention_resolutions[1]: must be >= 1, got -1"),
    ([f"--config.model.attention_resolutions=({BIG},)"], f"model.attention_resolutions[0]: must be <= 4096, got {BIG}"),
    (["--config.model.num_heads=0"], "model.num_heads: must be >= 1, got 0"),
    ([f"--config.model.num_heads={BIG}"], f"model.num_heads: must be <= 1024, got {BIG}"),
    (["--config.model.head_dim=0"], "model.head_dim: must be >= 1, got 0"),
    ([f"--config.model.head_dim={BIG}"], f"model.head_dim: must be <= 16384, got {BIG}"),
    (["--config.model.dropout=1.0"], "model.dropout: must be < 1, got 1.0"),
    (["--config.model.dropout=-0.1"], "model.dropout: must be >= 0, got -0.1"),
    (["--config.model.dropout=nan"], "model.dropout: must be a finite number, got nan"),
    (["--config.model.norm_num_groups=0"], "model.norm_num_groups: must be >= 1, got 0"),
    (["--config.model.norm_eps=0.0"], "model.norm_eps: must be > 0, got 0.0"),
    (["--config.model.norm_eps=inf"], "model.norm_eps: must be a finite number, got inf"),
    (["--config.model.freq_shift=nan"], "model.freq_shift: must be a finite number, got nan"),
    (["--config.model.num_classes=0"], "model.num_classes: must be >= 1, got 0"),
    ([f"--config.model.num_classes={BIG}"], f"model.num_classes: must be <= 1048576, got {BIG}"),
    # 0 is in range for dropout: the U-Net's own consistency check comes after
    (["--config.model.dropout=0.0", "--config.model.norm_num_groups=3"], "model.norm_num_groups: 3 does not"),
  ],
  "info": [
    (["--fake_devices=0"], "--fake_devices: must be >= 1, got 0"),
    (["--fake_devices=-8"], "--fake_devices: must be >= 1, got -8"),
    ([f"--fake_devices={BIG}"], f"--fake_devices: must be <= 1048576, got {BIG}"),
    (["--fake_devices=4"], "--fake_devices: asked for 4 CPU devices, JAX has 8"),
    (["--config.parallel.fsdp=0"], "parallel.fsdp: must be >= 1, got 0"),
    (["--config.parallel.fsdp=3"], "parallel.fsdp: must be a positive divisor of the 8 devices, got 3"),
    (["--num_processes=0"], "--num_processes: must be >= 1, got 0"),
    (["--num_processes=-4"], "--num_processes: must be >= 1, got -4"),
    ([f"--num_processes={BIG}"], f"--num_processes: must be <= 65536, got {BIG}"),
    (["--num_processes=3", f"--process_id={BIG}"], f"--process_id: must be <= 2, got {BIG}"),
    (["--process_id=-1"], "--process_id: must be >= 0, got -1"),
    (["--process_id=0", "--config.train.total_steps=0"], "train.total_steps: must be >= 1, got 0"),
  ],
  "verify": [
    (["--step=-1"], "--step: must be >= 0, got -1"),
    ([f"--step={2**31}"], f"--step: must be <= {2**31 - 1}, got {2**31}"),
    (["--step=0"], NO_STEP_0),
  ],
  "eval": [
    *_steps_cases(),
    *_num_cases(2, 1048576),
    (["--num=1"], "--num: must be >= 2, got 1"),
    (["--batch=0"], "--batch: must be >= 1, got 0"),
    (["--batch=-1"], "--batch: must be >= 1, got -1"),
    ([f"--batch={BIG}"], f"--batch: must be <= 1048576, got {BIG}"),
    *_eta_cases("plms"),
    (["--seed=-1"], "--seed: must be >= 0, got -1"),
    ([f"--seed={2**63}"], f"--seed: must be <= {MAX_SEED}, got {2**63}"),
    (["--checkpoint_step=-1"], "--checkpoint_step: must be >= 0, got -1"),
    ([f"--checkpoint_step={2**31}"], f"--checkpoint_step: must be <= {2**31 - 1}, got {2**31}"),
    (["--checkpoint_step=0"], NO_STEP_0),
    (["--cache_dir="], "--cache_dir: must be a non-empty path"),
    (["--eta=0", "--seed=0", "--checkpoint_step=0"], NO_STEP_0),
  ],
  "invert": [
    *_model_flag_cases("invert", "--input: required"),
    *_steps_cases(),
  ],
  "interpolate": [
    *_model_flag_cases("interpolate", "--seeds: give exactly one of"),
    *_steps_cases(),
    *_num_cases(2, 4096),
    (["--num=1"], "--num: must be >= 2, got 1"),
    (["--seeds=-1,2"], f"--seeds: each seed must be in [0, {MAX_SEED}], got -1"),
    ([f"--seeds=1,{2**63}"], f"--seeds: each seed must be in [0, {MAX_SEED}], got {2**63}"),
    (["--seeds=1,x"], "--seeds: expected two comma-separated integers, got '1,x'"),
    (["--seeds=1,2,3"], "--seeds: expected two comma-separated integers, got '1,2,3'"),
    # seeds 0 parse: the error after them is the --seeds / --input choice
    (["--seeds=0,0", "--input=a.png,b.png"], "--seeds: give exactly one of"),
  ],
  "edit": [  # run with --strength=0.5 unless a case gives another
    *_model_flag_cases("edit", "--input: required"),
    *_steps_cases(),
    *_num_cases(1, 4096),
    *_eta_cases("ddpm"),
    (["--strength=0"], "--strength: must be in (0, 1], got 0.0"),
    (["--strength=-0.5"], "--strength: must be in (0, 1], got -0.5"),
    (["--strength=1e30"], "--strength: must be in (0, 1], got 1e+30"),
    (["--strength=nan"], "--strength: must be a finite number, got nan"),
    (["--strength=inf"], "--strength: must be a finite number, got inf"),
    (["--eta=0", "--sampler=ddpm"], "--input: required"),
    (["--input=,"], "--input: no file given, got ','"),
  ],
  "inpaint": [
    *_model_flag_cases("inpaint", "--input: required"),
    *_steps_cases(),
    *_num_cases(1, 4096),
    *_eta_cases("ddpm"),
    (["--jump_length=0"], "--jump_length: must be >= 1, got 0"),
    (["--jump_length=-1"], "--jump_length: must be >= 1, got -1"),
    ([f"--jump_length={BIG}"], f"--jump_length: must be <= 100000, got {BIG}"),
    # the default 50 steps: a jump of 50 or more would never happen
    (["--jump_length=50"], "--jump_length: must be < the number of steps (50) for RePaint to resample, got 50"),
    (["--jump_n_sample=0"], "--jump_n_sample: must be >= 1, got 0"),
    (["--jump_n_sample=-1"], "--jump_n_sample: must be >= 1, got -1"),
    ([f"--jump_n_sample={BIG}"], f"--jump_n_sample: must be <= 1000, got {BIG}"),
    (["--eta=0"], "--input: required"),
    (["--eta=0.5", "--sampler=ddim"], "--input: required"),
  ],
  "txt2img": [  # flags first: the pipeline folder (which does not exist) is read after them
    (["--steps=0"], "--steps: must be >= 1, got 0"),
    (["--steps=-1"], "--steps: must be >= 1, got -1"),
    ([f"--steps={BIG}"], f"--steps: must be <= 100000, got {BIG}"),
    *_num_cases(1, 1048576),
    (["--num=1048576", "--prompt=b"], "--num: 2 prompts x 1048576 images exceed 1048576 images"),
    (["--height=0"], "--height: must be >= 1, got 0"),
    (["--height=-8"], "--height: must be >= 1, got -8"),
    ([f"--height={BIG}"], f"--height: must be <= 4096, got {BIG}"),
    (["--width=0"], "--width: must be >= 1, got 0"),
    (["--width=-8"], "--width: must be >= 1, got -8"),
    ([f"--width={BIG}"], f"--width: must be <= 4096, got {BIG}"),
    (["--guidance=-1"], "--guidance: must be >= 0.0, got -1.0"),
    (["--guidance=1e30"], "--guidance: must be <= 100.0, got 1e+30"),
    (["--guidance=nan"], "--guidance: must be a finite number, got nan"),
    (["--guidance=inf"], "--guidance: must be a finite number, got inf"),
    (["--guidance_rescale=-1"], "--guidance_rescale: must be >= 0.0, got -1.0"),
    (["--guidance_rescale=1e30"], "--guidance_rescale: must be <= 1.0, got 1e+30"),
    (["--guidance_rescale=inf"], "--guidance_rescale: must be a finite number, got inf"),
    (["--guidance_rescale=0.7", "--guidance=1"], "--guidance_rescale: only applies with classifier-free guidance"),
    (["--guidance_interval=0.1,x"], "--guidance_interval: expected LO,HI"),
    (["--guidance_interval=-1,2"], "--guidance_interval: needs 0 <= LO < HI"),
    *_eta_cases("plms"),
    (["--seed=-1"], "--seed: must be >= 0, got -1"),
    ([f"--seed={2**63}"], f"--seed: must be <= {MAX_SEED}, got {2**63}"),
    (["--strength=0"], "--strength: must be in (0, 1], got 0.0"),
    (["--strength=-0.5"], "--strength: must be in (0, 1], got -0.5"),
    (["--strength=1e30"], "--strength: must be in (0, 1], got 1e+30"),
    (["--strength=nan"], "--strength: must be a finite number, got nan"),
    (["--strength=inf"], "--strength: must be a finite number, got inf"),
    (["--out="], "--out: must be a non-empty path prefix"),
    (["--prompt= "], "--prompt: must not be empty"),
    (["--eta=0", "--guidance=0", "--guidance_rescale=0", "--seed=0"], "pipeline: folder not found"),
  ],
}


def _base_argv(command, workdir, tmp_path):
  """What a command needs besides the flags under test (nothing the cases check)."""
  if command == "train":
    return [f"--workdir={tmp_path}/t", "--config=configs/digits.py"]
  if command == "info":
    return ["--config=configs/digits.py"]
  if command == "txt2img":
    return [f"--pipeline={tmp_path}/t/pipeline", "--prompt=a cat", f"--out={tmp_path}/t/t2i"]
  return [f"--workdir={workdir}"] + (["--strength=0.5"] if command == "edit" else [])


@pytest.fixture(scope="module")
def conditional_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("cond"))
  model = _random_unet(3, num_classes=10)
  checkpoint.save(wd, 1, {"params": model, "ema_params": model}, _config(model))
  return wd


def _numeric_flags(command):
  """{name: "int" | "float"} of a command's flags parsed as numbers."""
  import importlib

  from absl import flags

  fv = importlib.import_module(cli.COMMANDS[command]).FLAGS
  return {
    f.name: "float" if isinstance(f.parser, flags.FloatParser) else "int"
    for f in fv._flags().values()
    # config.* flags are the overrides of a config already parsed in this process: config keys,
    # checked by the config's validation (the train cases below)
    if isinstance(f.parser, (flags.IntegerParser, flags.FloatParser)) and not f.name.startswith("config.")
  }


def _kinds(command):
  """{flag: the kinds of values its cases try}: zero, negative, absurd (>= 1e9), nonfinite."""
  out = {}
  for args, _ in FLAG_CASES.get(command, ()):
    for a in args:
      if a.startswith("--config") or "=" not in a:
        continue
      name, value = a[2:].split("=", 1)
      kinds = out.setdefault(name, set())
      try:
        v = float(value)
      except ValueError:
        continue
      kinds.add(
        "nonfinite"
        if not math.isfinite(v)
        else "zero"
        if v == 0
        else "negative"
        if v < 0
        else "absurd"
        if v >= 1e9
        else "other"
      )
  return out


def test_every_numeric_flag_is_covered():
  # every command of the dispatcher, so that a new command's flags fail here until reviewed
  missing = {}
  for command in cli.COMMANDS:
    tried = _kinds(command)
    for name, kind in _numeric_flags(command).items():
      need = {"zero", "negative", "absurd"} | ({"nonfinite"} if kind == "float" else set())
      if need - tried.get(name, set()):
        missing[f"{command} --{name}"] = sorted(need - tried.get(name, set()))
  assert not missing, missing
  assert set(FLAG_CASES) <= set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(FLAG_CASES))
def test_numeric_flags_are_range_checked(command, conditional_workdir, tmp_path, monkeypatch):
  before = sorted(os.listdir(conditional_workdir))
  for args, message in FLAG_CASES[command]:
    argv = [*_base_argv(command, conditional_workdir, tmp_path), *args]
    # as `python -m ddx` does (ml_collections reads --config.* overrides from sys.argv)
    monkeypatch.setattr(sys, "argv", ["ddx", command, *argv])
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      cli.main(sys.argv)
    assert "\n" not in str(e.value) and str(e.value).startswith(message), (args, str(e.value))
  assert sorted(os.listdir(conditional_workdir)) == before and not os.path.exists(tmp_path / "t")


@pytest.mark.slow
def test_bad_flags_from_the_command_line_are_one_line(conditional_workdir):
  for args, line in [
    (
      ["sample", f"--workdir={conditional_workdir}", "--steps=0", "--num=0"],
      "ddx sample: error: --steps: must be >= 1, got 0",
    ),
    (
      ["train", f"--workdir={conditional_workdir}/t", "--config=configs/digits.py", f"--config.sample.num={BIG}"],
      f"ddx train: error: sample.num: must be <= 1048576, got {BIG}",
    ),
  ]:
    p = _ddx(args)
    assert p.returncode == 1 and p.stderr.strip() == line, p.stderr[-1000:]
  assert not os.path.exists(os.path.join(conditional_workdir, "samples"))
  assert not os.path.exists(os.path.join(conditional_workdir, "t"))


# --- the safetensors importer -----------------------------------------------------------------

DIFFUSERS_TINY = dict(
  _class_name="UNet2DModel",
  sample_size=8,
  in_channels=1,
  out_channels=1,
  block_out_channels=(8, 16),
  layers_per_block=1,
  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
  attention_head_dim=None,
  norm_num_groups=4,
)


def _diffusers_folder(path, state=None):
  """A diffusers UNet2DModel folder written with the safetensors package alone (no torch): random
  weights under diffusers' names and torch layouts, or ``state`` as given."""
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(DIFFUSERS_TINY, f)
  if state is None:
    shapes = param_shapes(abstract(convert.diffusers_to_unet_config(DIFFUSERS_TINY)))
    rng, state = np.random.RandomState(0), {}
    for keys, like in jax.tree_util.tree_flatten_with_path(shapes)[0]:
      names = tuple(k.key for k in keys)
      name = convert._diffusers_name(names)
      shape = like.shape
      if names[-1] == "kernel":  # flax [kh, kw, I, O] / [I, O] -> torch [O, I, kh, kw] / [O, I]
        shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
      state[name] = rng.randn(*shape).astype(np.float32)
  save_file(state, os.path.join(path, convert.WEIGHTS_NAME))
  return state


def test_importer_names_the_damaged_tensor(tmp_path):
  from safetensors.numpy import load_file

  path = str(tmp_path / "unet")
  state = _diffusers_folder(path)
  fname = os.path.join(path, convert.WEIGHTS_NAME)
  convert.from_diffusers(path)  # the intact folder imports
  header_len = int.from_bytes(open(fname, "rb").read(8), "little")
  header = json.loads(open(fname, "rb").read(8 + header_len)[8:])
  # truncated (an interrupted download): the first tensor past the new end of the file is named
  data = open(fname, "rb").read()
  cut = len(data) * 2 // 3
  open(fname, "wb").write(data[:cut])
  first_cut = min(
    (v["data_offsets"][0], k)
    for k, v in header.items()
    if k != "__metadata__" and 8 + header_len + v["data_offsets"][1] > cut
  )[1]
  with pytest.raises(
    ValueError,
    match=rf": tensor {re.escape(first_cut)} is truncated: its data ends at byte \d+, "
    rf"the file at {cut} ",
  ) as e:
    convert.from_diffusers(path)
  assert "\n" not in str(e.value)
  # cut inside the header
  open(fname, "wb").write(data[:100])
  with pytest.raises(ValueError, match="truncated inside its header"):
    convert.from_diffusers(path)
  # a header entry whose shape does not fit its bytes
  name = sorted(header)[1]
  bad = dict(header, **{name: {**header[name], "shape": [3] + header[name]["shape"]}})
  text = json.dumps(bad).encode()
  text += b" " * (-len(text) % 8)
  open(fname, "wb").write(len(text).to_bytes(8, "little") + text + data[8 + header_len :])
  with pytest.raises(ValueError, match=rf": tensor {re.escape(name)}: F32\[3, .* needs \d+ bytes, the header gives it"):
    convert.from_diffusers(path)
  # a tensor of the wrong shape for the config
  _diffusers_folder(path, {**state, "conv_out.bias": np.zeros(4, np.float32)})
  with pytest.raises(
    ValueError, match=r"^weights: tensor conv_out.bias has shape \(4,\), which does not give the expected \(1,\)$"
  ):
    convert.from_diffusers(path)
  # a NaN inside a tensor (the file itself is well formed)
  poisoned = {**state, "mid_block.resnets.0.conv1.bias": np.full(16, np.nan, np.float32)}
  _diffusers_folder(path, poisoned)
  assert np.isnan(load_file(fname)["mid_block.resnets.0.conv1.bias"]).all()
  with pytest.raises(
    ValueError, match=r"^weights: tensor mid_block.resnets.0.conv1.bias has 16 non-finite values of 16$"
  ):
    convert.from_diffusers(path)
