"""The ``train`` command's two latent-diffusion set-ups (not a command of its own).

* ``kind="autoencoder"``: train `ddx.models.AutoencoderKL` on the data (minus the last
  ``autoencoder.holdout`` records) through the same loop and checkpoint layout, then measure
  the reconstruction error of the held-out records with the EMA weights of the last
  checkpoint: ``<workdir>/reconstruction.json`` and a grid ``<workdir>/samples/reconstructions_<step>.png``
  (rows: held-out originals, their reconstructions).
* ``latent.autoencoder_workdir``: replace the data by its latents under that (frozen)
  autoencoder (`ddx.latent_data`), and decode the sample grids. The autoencoder step and the
  scaling factor are resolved once and recorded in ``config.json``'s ``latent`` section (a
  resumed run reuses them), where `ddx sample` finds them.
"""

from __future__ import annotations

import json
import os

import numpy as np

RECONSTRUCTION_FILE = "reconstruction.json"


def train_autoencoder(workdir: str, cfg: dict, source, spec, stop_after: int | None) -> int:
  import jax  # pylint: disable=import-outside-toplevel

  from ddx import config as config_lib  # pylint: disable=import-outside-toplevel
  from ddx import loop  # pylint: disable=import-outside-toplevel
  from ddx.commands.train import print_summary  # pylint: disable=import-outside-toplevel
  from ddx.data.arrays import holdout_split  # pylint: disable=import-outside-toplevel
  from ddx.models import AutoencoderKL  # pylint: disable=import-outside-toplevel

  held_out = None
  if cfg["autoencoder"]["holdout"]:
    try:
      source, held_out = holdout_split(source, cfg["autoencoder"]["holdout"])
    except ValueError as e:
      raise ValueError(f"autoencoder.holdout: {str(e).split(': ', 1)[1]}") from None
  kw = config_lib.autoencoder_kwargs(cfg, in_channels=source.image_shape[-1])
  cfg["model"] = kw  # config.json's model section: what the checkpoints hold
  summary = loop.run(
      workdir, cfg, model_factory=lambda rngs: AutoencoderKL(**kw, rngs=rngs), num_classes=None,
      use_dropout=False, source=source, sched=None, optim=config_lib.optimizer_spec(cfg),
      loss=config_lib.autoencoder_loss_spec(cfg), loop=spec, sample=loop.SampleSpec(),
      stop_after_steps=stop_after)
  print_summary(summary)
  if held_out is not None and jax.process_index() == 0:
    report_reconstruction(workdir, held_out)
  return 0


def report_reconstruction(workdir: str, held_out) -> dict:
  """Held-out reconstruction error of the workdir's autoencoder (latest checkpoint, EMA weights,
  decode of the posterior mean); writes the JSON record and the grid, returns the record."""
  from ddx import autoencoder_train, images, service  # pylint: disable=import-outside-toplevel
  vae, _, step = service.load_autoencoder(workdir)
  x = held_out.images
  x_hat, mean, std = autoencoder_train.reconstruct(vae, x)
  rec = autoencoder_train.reconstruction_metrics(x, x_hat)
  rec.update(step=step, held_out="the last {} records of the data".format(len(x)),
             latent_std=float(np.std(mean)), posterior_std_mean=float(np.mean(std)))
  path = os.path.join(workdir, RECONSTRUCTION_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(rec, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(path + ".tmp", path)
  n = min(len(x), 32)
  rows = []
  for i in range(0, n, 16):  # pairs of rows: originals, then their reconstructions
    rows += [x[i:i + 16], x_hat[i:i + 16]]
  grid = images.make_grid(images.to_uint8(np.concatenate(rows)), ncols=min(n, 16))
  png = images.save_png(os.path.join(workdir, "samples", f"reconstructions_{step:08d}.png"), grid, scale=4)
  print(f"held-out reconstruction ({rec['num']} images, step {step}, EMA weights, posterior mean): "
        f"MSE {rec['mse']:.5f}  PSNR {rec['psnr_db']:.2f} dB  MAE {rec['mae']:.4f}  -> {path}, {png}", flush=True)
  return rec


def latent_source(workdir: str, cfg: dict, source):
  """``(latent source, decode)`` for a latent diffusion config; fills ``cfg["latent"]``."""
  from ddx import checkpoint, latent_data, service  # pylint: disable=import-outside-toplevel
  lat = dict(cfg["latent"])
  lat["autoencoder_workdir"] = os.path.abspath(lat["autoencoder_workdir"])
  try:  # a resumed run keeps the autoencoder step and scaling factor it started with
    previous = checkpoint.read_config(workdir).get("latent") or {}
  except (FileNotFoundError, ValueError):
    previous = {}
  if previous.get("autoencoder_workdir") == lat["autoencoder_workdir"]:
    for key in ("autoencoder_step", "scaling_factor"):
      if lat[key] is None:
        lat[key] = previous.get(key)
  vae, _, lat["autoencoder_step"] = service.load_autoencoder(lat["autoencoder_workdir"], step=lat["autoencoder_step"])
  means, stds, labels = latent_data.encode_source(vae, source)
  if lat["scaling_factor"] is None:
    lat["scaling_factor"] = latent_data.estimate_scaling_factor(means)
  cfg["latent"] = lat
  sf = lat["scaling_factor"]
  print(f"latents: {means.shape[0]} x {means.shape[1:]} from {lat['autoencoder_workdir']} step "
        f"{lat['autoencoder_step']} (posterior means); std {np.std(means):.4g}, mean {np.mean(means):.4g}, "
        f"scaling factor {sf:.4g}; mean posterior std x scaling factor {np.mean(stds) * sf:.3g}", flush=True)
  decoder = service.load_latent_decoder(cfg)
  return (latent_data.latent_source(means, labels, source.num_classes, sf),
          lambda z: service.decode_latents(decoder, z))
