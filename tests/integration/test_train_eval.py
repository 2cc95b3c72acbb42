"""Sample quality during training (``train.eval_every``): the loop writes digits FD / KID /
precision / recall into metrics.jsonl and TensorBoard at the right steps, sampling over a
2-device mesh; the train command turns the ``eval`` section into the loop's arguments; bad
values in that section are one-line errors naming the key, raised before anything is built."""

import glob
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ddx
from ddx import data, parallel
from ddx.cli import config as config_lib
from ddx.training import loop
from ddx.training import step as train_lib
from tests import _tiny as tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _TinyEps(nnx.Module):
  """A two-conv eps model: the loop does not care about the architecture, and it compiles in
  a fraction of a U-Net's time (``ddx train`` with a U-Net and eval_every was run by hand over
  2 processes: the same numbers, written once)."""

  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.temb = nnx.Linear(1, 8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 1, (3, 3), rngs=rngs)

  def __call__(self, x, t, y=None, dropout_key=None):
    h = self.conv1(x) + self.temb(t[:, None].astype(jnp.float32) / 1000.0)[:, None, None, :]
    return self.conv2(jax.nn.silu(h))


def _tb_scalars(workdir):
  """{tag: {step: value}} from the tensorboardX event files (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2

  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      buf = f.read()
    pos = 0
    while pos < len(buf):
      (n,) = struct.unpack("<Q", buf[pos : pos + 8])
      ev = event_pb2.Event.FromString(buf[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out


def _run(workdir, evaluation, eval_every=2, total_steps=4):
  cfg = {
    "model": {"tiny": True},
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
    seed=0,
    global_batch_size=8,
    total_steps=total_steps,
    checkpoint_every=total_steps,
    eval_every=eval_every,
    log_every_seconds=100.0,
  )
  return loop.run(
    workdir,
    cfg,
    model_factory=lambda r: _TinyEps(rngs=r),
    num_classes=None,
    use_dropout=False,
    source=data.make_source("digits", image_size=16),
    sched=ddx.schedules.make("linear", 1000),
    optim=train_lib.OptimizerSpec(warmup_steps=1),
    loss=train_lib.LossSpec(),
    loop=spec,
    sample=loop.SampleSpec(),
    evaluation=evaluation,
    mesh=parallel.data_mesh(jax.devices()[:2]),
  )


@pytest.mark.slow
def test_loop_evaluates_every_n_steps(tmp_path, capsys):
  from ddx.eval import quality

  net = quality.feature_net("digits")
  ref = quality.reference_for_source(
    net, data.make_source("digits", image_size=16), cache_dir=str(tmp_path / "c"), dataset="digits", split="train"
  )
  ev = loop.EvalSpec(net=net, reference=ref, sampler="ddim", steps=2, sampler_kwargs={"eta": 0.0}, num=24, batch=12)
  wd = str(tmp_path / "run")
  _run(wd, ev)
  out = capsys.readouterr().out
  assert out.count("eval at step") == 2 and "ddim S=2 N=24 [digits_cnn-" in out, out
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  evals = [r for r in rows if "eval/fd" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert set(r) == {"step", "eval/fd", "eval/kid_mean", "eval/kid_std", "eval/precision", "eval/recall"}
    assert np.isfinite(r["eval/fd"]) and r["eval/fd"] > 0 and np.isfinite(r["eval/kid_mean"])
    assert 0 <= r["eval/precision"] <= 1 and 0 <= r["eval/recall"] <= 1
  # the weights changed between the two evaluations, so did the numbers
  assert evals[0]["eval/fd"] != evals[1]["eval/fd"]
  tb = _tb_scalars(wd)
  assert sorted(tb["eval/fd"]) == [2, 4] and sorted(tb["eval/recall"]) == [2, 4]
  np.testing.assert_allclose(tb["eval/fd"][4], evals[1]["eval/fd"], rtol=1e-6)


def test_loop_needs_an_eval_spec(tmp_path):
  with pytest.raises(ValueError, match="evaluation: required when loop.eval_every > 0"):
    _run(str(tmp_path), None)
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_train_command_translates_the_eval_section(tmp_path):
  from ddx.cli.commands import train as train_cmd

  cfg = config_lib.validate(
    _config(train__eval_every=100, eval__sampler="ddpm", eval__steps=20, eval__num=500, eval__batch=100)
  )
  source = data.make_source("digits", image_size=16)
  ev = train_cmd._eval_spec(cfg, source, str(tmp_path))
  assert (ev.sampler, ev.steps, ev.num, ev.batch) == ("ddpm", 20, 500, 100)
  assert ev.sampler_kwargs == {"prediction": "eps", "variance": "fixed_large", "clip_sample": True}
  assert ev.net.name.startswith("digits_cnn-") and ev.reference.num == 1797 and ev.reference.features.shape[1] == 64
  assert glob.glob(os.path.join(tmp_path, "eval_cache", "digits_cnn-*__digits-train-16.npz"))
  assert not glob.glob(os.path.join(tmp_path, "eval_cache", "*.tmp-*"))


def _config(**overrides):
  return tiny.config("digits", **overrides)


@pytest.mark.parametrize(
  "overrides,msg",
  [
    (dict(train__eval_every=-1), "train.eval_every: must be >= 0, got -1"),
    (
      dict(
        train__eval_every=3,
        train__steps_per_call=2,
        train__total_steps=10,
        train__checkpoint_every=10,
        train__sample_every=10,
      ),
      "train.eval_every: 3 must be a multiple of train.steps_per_call=2",
    ),
    (dict(eval__features="clip"), "eval.features: must be one of ('digits', 'inception'), got 'clip'"),
    (dict(eval__sampler="k_euler"), "eval.sampler: must be one of"),
    (dict(eval__num=1), "eval.num: must be >= 2, got 1"),
    (dict(eval__steps=1001), "eval.steps: must be <= 1000, got 1001"),
    (dict(eval__eta=-0.5), "eval.eta: must be >= 0, got -0.5"),
    (
      dict(train__eval_every=100, data__image_size=32, model__image_size=32),
      "eval.features: digits takes 16x16x1 images; this model makes 32x32x1 (use inception)",
    ),
    (dict(train__eval_every=100, eval__features="inception"), "eval.inception_weights: required with"),
    (
      dict(train__eval_every=100, eval__features="inception", eval__inception_weights="/nonexistent/w.pth"),
      "eval.inception_weights: no file at '/nonexistent/w.pth'; ddx never downloads weights",
    ),
  ],
)
def test_eval_config_errors(overrides, msg):
  with pytest.raises(ValueError) as e:
    config_lib.validate(_config(**overrides))
  assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_eval_config_checked_only_when_training_evaluates():
  # a 32x32 model with the default (digits) features is fine while train.eval_every = 0
  cfg = config_lib.validate(_config(data__image_size=32, model__image_size=32, eval__features="inception"))
  assert cfg["train"]["eval_every"] == 0 and cfg["eval"]["num"] == 1000


def test_digits_large_config_is_valid_and_evaluates():
  sys.path.insert(0, ROOT)
  from configs import digits_large

  cfg = config_lib.validate(digits_large.get_config())
  assert cfg["train"]["eval_every"] > 0 and cfg["train"]["total_steps"] % cfg["train"]["eval_every"] == 0
  assert cfg["eval"]["features"] == "digits" and (cfg["model"]["image_size"], cfg["model"]["in_channels"]) == (16, 1)
