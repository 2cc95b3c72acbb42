"""``python -m ddx eval`` end to end on a tiny workdir, and its bad-input errors.

The workdir is written through the library (validated digits config with a tiny U-Net, one
checkpoint of its initial weights) rather than by ``ddx train``: the command under test only
reads config.json and a checkpoint, and compiling a training step would dominate the test
(``ddx train`` writing such workdirs is tested in test_train.py).
"""

import json
import os
import sys

import jax
import numpy as np
import pytest

from ddx.cli import config as config_lib
from ddx.cli import main as cli
from ddx.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_config():
  sys.path.insert(0, ROOT)
  from configs import digits

  c = digits.get_config()
  c.model.base_channels = 8
  c.model.channel_mult = (1, 2)
  c.model.attention_resolutions = ()
  c.model.norm_num_groups = 4
  return config_lib.validate(c)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from ddx.models import UNetConfig, abstract, param_shapes

  cfg = _tiny_config()
  w = str(tmp_path_factory.mktemp("run"))
  # Seeded random weights of the right shapes, without running (or compiling) the U-Net's init.
  shapes = param_shapes(abstract(UNetConfig.from_json(cfg["model"])))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
  checkpoint.save(w, 3, {"params": params, "ema_params": params}, config=cfg)
  return w


def _eval(*flags):
  return cli.main(["ddx", "eval", *flags])


@pytest.mark.slow
def test_eval_end_to_end(workdir, tmp_path, capsys):
  cache = str(tmp_path / "cache")
  args = [f"--workdir={workdir}", "--sampler=ddim", "--steps=3", "--num=40", "--batch=16", f"--cache_dir={cache}"]
  assert _eval(*args) == 0
  out = capsys.readouterr().out
  assert "step 3 ddim S=3 N=40 [digits_cnn-" in out and "FD " in out
  with open(os.path.join(workdir, "eval.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert len(rows) == 1
  r = rows[0]
  assert (r["step"], r["sampler"], r["steps"], r["num"], r["weights"]) == (3, "ddim", 3, 40, "ema_params")
  assert r["features"].startswith("digits_cnn-") and r["reference"] == {
    "dataset": "digits",
    "split": "train",
    "num": 1797,
  }
  assert np.isfinite(r["fd"]) and r["fd"] > 0 and np.isfinite(r["kid_mean"]) and 0 <= r["precision"] <= 1
  assert os.listdir(cache) == [f"{r['features']}__digits-train-16.npz"]


@pytest.mark.parametrize(
  "flags,exc,msg",
  [
    (["--num=1"], ValueError, "--num: must be >= 2, got 1"),
    (["--features=clip"], ValueError, "--features: must be one of"),
    (["--features=inception"], ValueError, "--inception_weights: required"),
    (
      ["--features=inception", "--inception_weights=/nonexistent/pt_inception.pth"],
      ValueError,
      "--inception_weights: no file at '/nonexistent/pt_inception.pth'",
    ),
  ],
)
def test_eval_bad_input_writes_nothing(workdir, tmp_path, flags, exc, msg):
  before = sorted(os.listdir(workdir))
  cache = tmp_path / "cache"
  with pytest.raises(exc, match=msg.replace("[", r"\[")) as e:
    _eval(f"--workdir={workdir}", "--steps=2", f"--cache_dir={cache}", *flags)
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(workdir)) == before and not cache.exists()


def test_eval_no_checkpoint(tmp_path):
  w = tmp_path / "empty"
  checkpoint.write_config(str(w), _tiny_config())
  with pytest.raises(FileNotFoundError, match="no checkpoint in") as e:
    _eval(f"--workdir={w}", "--num=8")
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(w)) == ["config.json"]
