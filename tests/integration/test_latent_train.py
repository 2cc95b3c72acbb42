"""Latent diffusion on the embedded digits through the real commands: a KL autoencoder
(`ddx train` with kind="autoencoder"), a class-conditional latent model on its latents, and
`ddx sample` decoding the samples. Tiny sizes and few steps; the real recipe is in docs/latent.md."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ddx.cli import main as cli
from ddx.cli import restore
from ddx.data import arrays, make_source
from ddx.latent import data as latent_data
from ddx.training import autoencoder as autoencoder_train
from ddx.training import checkpoint
from tests.conftest import shared_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLDOUT = 297
COMMON = ["--config.train.log_every_seconds=0.01", "--config.train.steps_per_call=1", "--config.optim.warmup_steps=20"]
AE_STEPS = 150
AE_FLAGS = [
  f"--config={ROOT}/configs/digits_autoencoder.py",
  "--config.autoencoder.block_out_channels=(8,16)",
  "--config.autoencoder.norm_num_groups=4",
  "--config.autoencoder.mid_block_add_attention=False",
  "--config.train.global_batch_size=16",
  f"--config.train.total_steps={AE_STEPS}",
  f"--config.train.checkpoint_every={AE_STEPS}",
  *COMMON,
]
LATENT_FLAGS = [
  f"--config={ROOT}/configs/digits_latent.py",
  "--config.model.base_channels=8",
  "--config.model.channel_mult=(1,)",
  "--config.model.attention_resolutions=()",
  "--config.model.norm_num_groups=4",
  "--config.train.global_batch_size=16",
  "--config.train.total_steps=100",
  "--config.train.checkpoint_every=100",
  "--config.train.sample_every=100",
  "--config.sample.num=8",
  "--config.sample.steps=5",
  *COMMON,
]
# Held-out MSE on the [-1, 1] scale: predicting the training digits' per-pixel mean image
# scores 0.180 (recomputed in the test), an all-background image 0.80; the real recipe
# (configs/digits_autoencoder.py) reaches 0.0005.
MAX_HELD_OUT_MSE = 0.04


def _train(path, *flags):
  assert cli.execute(["ddx", "train", f"--workdir={path}", *flags]) == 0


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return [r["loss"] for r in rows if "loss" in r]


def _falls(losses, factor):
  k = max(len(losses) // 10, 1)
  first, last = np.mean(losses[:k]), np.mean(losses[-k:])
  assert len(losses) >= 10 and last < factor * first, (first, last)


@pytest.fixture(scope="session")
def ae_workdir():
  """The autoencoder, trained in-process once per run (shared by the xdist workers)."""
  return shared_dir("digits_ae", lambda wd: _train(wd, *AE_FLAGS))


@pytest.fixture(scope="session")
def latent_workdir(ae_workdir):
  return shared_dir(
    "digits_latent", lambda wd: _train(wd, *LATENT_FLAGS, f"--config.latent.autoencoder_workdir={ae_workdir}")
  )


@pytest.mark.slow
def test_autoencoder_trains_and_reconstructs_held_out_digits(ae_workdir):
  _falls(_losses(ae_workdir), 0.5)
  cfg = checkpoint.read_config(ae_workdir)
  assert cfg["kind"] == "autoencoder" and cfg["model"]["latent_channels"] == 2
  assert checkpoint.all_steps(ae_workdir) == [AE_STEPS]
  with open(os.path.join(ae_workdir, "reconstruction.json")) as f:
    rec = json.load(f)
  assert rec["num"] == HOLDOUT and rec["step"] == AE_STEPS
  # recompute independently from the checkpoint and the held-out digits
  train, held = arrays.holdout_split(make_source("digits", image_size=16), HOLDOUT)
  vae, _, _ = restore.load_autoencoder(ae_workdir)
  x_hat, _, _ = autoencoder_train.reconstruct(vae, held.images)
  mse = float(np.mean((x_hat.astype(np.float64) - held.images) ** 2))
  np.testing.assert_allclose(rec["mse"], mse, rtol=1e-6)
  np.testing.assert_allclose(rec["psnr_db"], 10 * np.log10(4 / mse), rtol=1e-6)
  baseline = float(np.mean((train.images.mean(0, keepdims=True) - held.images) ** 2))
  assert mse < MAX_HELD_OUT_MSE and mse < 0.25 * baseline, (mse, baseline)
  png = os.path.join(ae_workdir, "samples", f"reconstructions_{AE_STEPS:08d}.png")
  assert np.asarray(Image.open(png)).dtype == np.uint8


@pytest.mark.slow
def test_latent_model_trains_and_sample_decodes(ae_workdir, latent_workdir, tmp_path, ddx_cli):
  _falls(_losses(latent_workdir), 0.8)
  cfg = checkpoint.read_config(latent_workdir)
  lat = cfg["latent"]
  assert lat["autoencoder_workdir"] == ae_workdir and lat["autoencoder_step"] == AE_STEPS
  # the scaling factor is 1 / std of the posterior means of every digit
  vae, _, _ = restore.load_autoencoder(ae_workdir)
  means, _, _ = latent_data.encode_source(vae, make_source("digits", image_size=16))
  np.testing.assert_allclose(lat["scaling_factor"], 1.0 / np.std(means.astype(np.float64)), rtol=1e-5)
  # the training sample grid is decoded
  grid = np.load(os.path.join(latent_workdir, "samples", "step_00000100.npz"))["samples"]
  assert grid.shape == (8, 16, 16, 1) and grid.min() >= -1 and grid.max() <= 1
  out = str(tmp_path / "decoded")
  code, _, err = ddx_cli("sample", f"--workdir={latent_workdir}", "--num=8", "--steps=5", "--label=3", f"--out={out}")
  assert code == 0, err[-2000:]
  x = np.load(out + ".npz")["samples"]
  assert x.shape == (8, 16, 16, 1) and np.all(np.isfinite(x))
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.05  # images, not a constant
  png = np.asarray(Image.open(out + ".png"))
  assert png.dtype == np.uint8 and png.ndim == 2 and png.shape[0] > 16
  # a σ-space sampler on a Karras grid through the same command (float timesteps, scaled input)
  code, _, err = ddx_cli(
    "sample", f"--workdir={latent_workdir}", "--num=8", "--steps=3", "--sampler=heun", "--sigmas=karras", "--label=3"
  )
  assert code == 0, err[-2000:]
  (name,) = [n for n in os.listdir(os.path.join(latent_workdir, "samples")) if n.endswith("_heun3_karras.npz")]
  y = np.load(os.path.join(latent_workdir, "samples", name))["samples"]
  assert y.shape == x.shape and np.all(np.isfinite(y)) and y.std() > 0.05


def _error(argv):
  with pytest.raises(ValueError) as e:
    cli.main(["ddx", *argv])
  msg = str(e.value)
  assert "\n" not in msg
  return msg


@pytest.mark.slow
def test_bad_latent_configs_fail_in_one_line(ae_workdir, tmp_path, ddx_cli):
  error = _error
  wd = str(tmp_path / "w")
  base = ["train", f"--workdir={wd}", f"--config={ROOT}/configs/digits_latent.py"]
  msg = error(base + [f"--config.latent.autoencoder_workdir={tmp_path / 'missing'}"])
  assert msg.startswith("latent.autoencoder_workdir: workdir does not exist")
  pixel = tmp_path / "pixel"
  checkpoint.write_config(str(pixel), {"model": {}, "diffusion": {}})
  assert "not an autoencoder" in error(base + [f"--config.latent.autoencoder_workdir={pixel}"])
  ok = [f"--config.latent.autoencoder_workdir={ae_workdir}"]
  assert error(base + ok + ["--config.model.in_channels=4"]).startswith("model.in_channels: must be 2")
  assert error(base + ok + ["--config.model.image_size=16"]).startswith("model.image_size: must be 8")
  assert error(base + ok + ["--config.sample.clip_sample=True"]).startswith("sample.clip_sample:")
  assert error(base + ok + ["--config.latent.autoencoder_step=7"]).startswith("latent.autoencoder_step:")
  assert error(
    [
      "train",
      f"--workdir={wd}",
      f"--config={ROOT}/configs/digits_autoencoder.py",
      "--config.autoencoder.reconstruction=l3",
    ]
  ).startswith("autoencoder.reconstruction:")
  assert error(
    ["train", f"--workdir={wd}", f"--config={ROOT}/configs/digits_autoencoder.py", "--config.autoencoder.holdout=1797"]
  ).startswith("autoencoder.holdout:")
  assert error(["sample", f"--workdir={ae_workdir}"]).startswith("--workdir: holds an autoencoder")
  assert not os.path.exists(wd)
  # the command line prints it as one line
  code, _, err = ddx_cli(*base, f"--config.latent.autoencoder_workdir={tmp_path / 'missing'}")
  assert code == 1 and err.count("\n") == 1 and "latent.autoencoder_workdir" in err


def test_autoencoder_loss_and_holdout_split():
  rng = np.random.default_rng(0)
  x, x_hat = rng.uniform(-1, 1, (3, 4, 4, 1)), rng.uniform(-1, 1, (3, 4, 4, 1))
  kl = rng.uniform(0, 50, (3,))
  for rec, f in (("l1", np.abs), ("l2", np.square)):
    got = autoencoder_train.autoencoder_loss(x, x_hat, kl, autoencoder_train.AutoencoderLossSpec(rec, 0.01))
    want = (f(x_hat - x).sum(axis=(1, 2, 3)) + 0.01 * kl) / 16
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  src = make_source("digits", image_size=8)
  train, held = arrays.holdout_split(src, 100)
  assert len(train) == 1697 and len(held) == 100
  np.testing.assert_array_equal(held.images, src.images[-100:])
  np.testing.assert_array_equal(train.labels, src.labels[:-100])
  with pytest.raises(ValueError, match="num_holdout"):
    arrays.holdout_split(src, 0)
  z = rng.normal(0.3, 2.5, (50, 2, 2, 2))
  np.testing.assert_allclose(latent_data.estimate_scaling_factor(z), 1 / z.std(), rtol=1e-12)
