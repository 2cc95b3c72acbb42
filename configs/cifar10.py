"""The DDPM paper's CIFAR-10 recipe (Ho et al. 2020): 35.7M-parameter U-Net, linear betas
1e-4 -> 0.02, T = 1000, Adam 2e-4, batch 128, warmup 5000, grad clip 1, EMA 0.9999,
dropout 0.1, random flips, 800k steps. Prepare the data once with
`python -m ddx.data.tfds_sources cifar10`.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.random_flip = True
  c.model.image_size = 32
  c.model.in_channels = 3
  c.model.base_channels = 128
  c.model.channel_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attention_resolutions = (16,)
  c.model.norm_num_groups = 32
  c.model.dropout = 0.1
  c.diffusion.beta_schedule = "linear"
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.diffusion.num_timesteps = 1000
  c.diffusion.variance = "fixed_large"
  c.train.global_batch_size = 128
  c.train.total_steps = 800_000
  c.train.ema_decay = 0.9999
  c.train.checkpoint_every = 10_000
  c.train.keep_period = 100_000
  c.train.sample_every = 20_000
  c.optim.name = "adam"
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.grad_clip = 1.0
  return c
