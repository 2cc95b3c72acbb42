"""A small KL autoencoder on the embedded digits (16x16 -> 8x8x2 latents), for latent diffusion.

Reconstruction (L1) + a small-weight KL, no perceptual or adversarial term. The last 297 of
the 1797 digits are held out of training; at the end the train command reports their
reconstruction error (reconstruction.json, samples/reconstructions_*.png).

    python -m ddx train --config=configs/digits_autoencoder.py --workdir=runs/digits_ae

Then train a latent diffusion model on its latents: configs/digits_latent.py.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.kind = "autoencoder"
  c.data.name = "digits"
  c.data.image_size = 16
  c.autoencoder.block_out_channels = (16, 32)
  c.autoencoder.layers_per_block = 1
  c.autoencoder.latent_channels = 2
  c.autoencoder.norm_num_groups = 8
  c.autoencoder.mid_block_add_attention = True
  c.autoencoder.reconstruction = "l1"
  c.autoencoder.kl_weight = 1e-5
  c.autoencoder.holdout = 297
  c.train.global_batch_size = 32
  c.train.total_steps = 800
  c.train.steps_per_call = 1
  c.train.ema_decay = 0.999
  c.train.ema_warmup = True
  c.train.checkpoint_every = 400
  c.train.sample_every = 0
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.final_lr_fraction = 0.05
  return c
