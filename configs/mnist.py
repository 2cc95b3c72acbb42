"""MNIST 28x28 (tfds; prepare once with `python -m ddx.data.tfds_sources mnist`)."""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "mnist"
  c.data.image_size = 28
  c.model.image_size = 28
  c.model.in_channels = 1
  c.model.base_channels = 64
  c.model.channel_mult = (1, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attention_resolutions = (14,)
  c.model.norm_num_groups = 32
  c.model.dropout = 0.1
  c.train.global_batch_size = 128
  c.train.total_steps = 100_000
  c.train.ema_decay = 0.9995
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 1000
  return c
