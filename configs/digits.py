"""The embedded default: scikit-learn's 8x8 handwritten digits upsampled to 16x16.

Runs anywhere, offline: a 0.28M-parameter U-Net, trains in a few minutes on 2 CPU cores; its
DDIM-50 samples are recognisable digits.

    python -m ddx train --config=configs/digits.py --workdir=runs/digits
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "digits"
  c.data.image_size = 16
  c.model.image_size = 16
  c.model.in_channels = 1
  c.model.base_channels = 16
  c.model.channel_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attention_resolutions = (8,)
  c.model.norm_num_groups = 8
  c.model.dropout = 0.0
  c.diffusion.variance = "fixed_large"
  c.train.global_batch_size = 64
  c.train.total_steps = 2400
  c.train.steps_per_call = 1  # CPU: unrolled steps cost compile time (see ddx.training.step.make_train_fn)
  c.train.ema_decay = 0.999
  c.train.ema_warmup = True
  c.train.checkpoint_every = 600
  c.train.sample_every = 1200
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.optim.decay = "cosine"
  c.optim.final_lr_fraction = 0.05
  c.sample.num = 64
  return c
