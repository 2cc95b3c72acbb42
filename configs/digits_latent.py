"""Class-conditional latent diffusion on the embedded digits, in the latents of
configs/digits_autoencoder.py (8x8x2, scaled to unit variance).

    python -m ddx train --config=configs/digits_autoencoder.py --workdir=runs/digits_ae
    python -m ddx train --config=configs/digits_latent.py --workdir=runs/digits_latent
    python -m ddx sample --workdir=runs/digits_latent --guidance=2   # decoded by the autoencoder

Another autoencoder: --config.latent.autoencoder_workdir=PATH.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "digits"
  c.data.image_size = 16
  c.latent.autoencoder_workdir = "runs/digits_ae"
  c.model.image_size = 8  # the autoencoder's latent side (16 / 2)
  c.model.in_channels = 2  # and its latent channels
  c.model.base_channels = 32
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = (4,)
  c.model.norm_num_groups = 8
  c.model.dropout = 0.0
  c.model.num_classes = 10
  c.diffusion.variance = "fixed_large"
  c.train.global_batch_size = 64
  c.train.total_steps = 1500
  c.train.steps_per_call = 1
  c.train.ema_decay = 0.999
  c.train.ema_warmup = True
  c.train.label_dropout = 0.1
  c.train.checkpoint_every = 500
  c.train.sample_every = 750
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.final_lr_fraction = 0.05
  c.sample.num = 100
  c.sample.guidance = 2.0
  c.sample.clip_sample = False  # latents are not in [-1, 1]
  return c
