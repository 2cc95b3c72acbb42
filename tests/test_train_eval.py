"""Sample quality during training (``train.eval_every``): a tiny 16x16 digits run over two JAX
processes writes digits FD / KID / precision / recall into metrics.jsonl and TensorBoard at
the right steps, once; and the ``eval`` config section's bad values are one-line errors
naming the key, raised before anything is built."""

import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from ddx import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY16_FLAGS = [
    "--config=configs/digits.py", "--config.model.base_channels=8", "--config.model.channel_mult=(1,2)",
    "--config.model.attention_resolutions=()", "--config.model.norm_num_groups=4",
    "--config.train.global_batch_size=8", "--config.train.log_every_seconds=100", "--config.train.sample_every=0",
    "--config.optim.warmup_steps=2", "--config.train.checkpoint_every=4", "--config.train.total_steps=4",
    "--config.train.eval_every=2", "--config.eval.num=24", "--config.eval.batch=12", "--config.eval.steps=2",
]


def _tb_scalars(workdir):
  """{tag: {step: value}} from the tensorboardX event files (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      buf = f.read()
    pos = 0
    while pos < len(buf):
      (n,) = struct.unpack("<Q", buf[pos:pos + 8])
      ev = event_pb2.Event.FromString(buf[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out


def test_train_evaluates_every_n_steps_over_two_processes(tmp_path):
  wd = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), DDX_LOG_DIR=str(tmp_path))
  p = subprocess.run(["bash", "launch/local_multihost.sh", "2", "1", "--", sys.executable, "-m", "ddx", "train",
                      f"--workdir={wd}", *TINY16_FLAGS], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "2 processes" in p.stdout and p.stdout.count("eval at step") == 2, p.stdout[-2000:]
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  evals = [r for r in rows if "eval/fd" in r]
  assert [r["step"] for r in evals] == [2, 4]  # once each: only process 0 writes
  for r in evals:
    assert set(r) == {"step", "eval/fd", "eval/kid_mean", "eval/kid_std", "eval/precision", "eval/recall"}
    assert np.isfinite(r["eval/fd"]) and r["eval/fd"] > 0 and np.isfinite(r["eval/kid_mean"])
    assert 0 <= r["eval/precision"] <= 1 and 0 <= r["eval/recall"] <= 1
  # the weights changed between the two evaluations, so did the numbers
  assert evals[0]["eval/fd"] != evals[1]["eval/fd"]
  tb = _tb_scalars(wd)
  assert sorted(tb["eval/fd"]) == [2, 4]
  np.testing.assert_allclose(tb["eval/fd"][4], evals[1]["eval/fd"], rtol=1e-6)
  # the reference statistics were cached once, under the workdir
  assert len(glob.glob(os.path.join(wd, "eval_cache", "digits_cnn-*__digits-train-16.npz"))) == 1
  assert not glob.glob(os.path.join(wd, "eval_cache", "*.tmp-*"))


def _config(**overrides):
  sys.path.insert(0, ROOT)
  from configs import digits  # pylint: disable=import-outside-toplevel
  c = digits.get_config()
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


@pytest.mark.parametrize("overrides,msg", [
    (dict(train__eval_every=-1), "train.eval_every: must be >= 0, got -1"),
    (dict(train__eval_every=3, train__steps_per_call=2, train__total_steps=10, train__checkpoint_every=10,
          train__sample_every=10), "train.eval_every: 3 must be a multiple of train.steps_per_call=2"),
    (dict(eval__features="clip"), "eval.features: must be one of ('digits', 'inception'), got 'clip'"),
    (dict(eval__sampler="euler"), "eval.sampler: must be one of"),
    (dict(eval__num=1), "eval.num: must be >= 2, got 1"),
    (dict(eval__steps=1001), "eval.steps: must be <= 1000, got 1001"),
    (dict(eval__eta=-0.5), "eval.eta: must be >= 0, got -0.5"),
    (dict(train__eval_every=100, data__image_size=32, model__image_size=32),
     "eval.features: digits takes 16x16x1 images; this model makes 32x32x1 (use inception)"),
    (dict(train__eval_every=100, eval__features="inception"), "eval.inception_weights: required with"),
    (dict(train__eval_every=100, eval__features="inception", eval__inception_weights="/nonexistent/w.pth"),
     "eval.inception_weights: no file at '/nonexistent/w.pth'; ddx never downloads weights"),
])
def test_eval_config_errors(overrides, msg):
  with pytest.raises(ValueError) as e:
    config_lib.validate(_config(**overrides))
  assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_eval_config_checked_only_when_training_evaluates():
  # a 32x32 model with the default (digits) features is fine while train.eval_every = 0
  cfg = config_lib.validate(_config(data__image_size=32, model__image_size=32, eval__features="inception"))
  assert cfg["train"]["eval_every"] == 0 and cfg["eval"]["num"] == 1000
