"""A better digits model within 30 minutes on 2 CPU cores: a wider and deeper U-Net trained
longer than the quick default (configs/digits.py stays as it is).

    python -m ddx train --config=configs/digits_large.py --workdir=runs/digits_large

Changes from configs/digits.py: base_channels 16 -> 24 and num_res_blocks 1 -> 2 (0.28M ->
0.92M parameters), total_steps 2400 -> 4000 (142 epochs of the 1797 digits at batch 64),
warmup 200 -> 300, and digits FD / KID / precision / recall of 500 DDIM-50 samples at steps
2000 and 4000 (train.eval_every, into metrics.jsonl and TensorBoard).

Time estimate (not a measured full run: the machine was shared with other jobs). The default
runs 2400 steps in 392 s on a quiet 2-core machine (6.1 steps/s). Measured back to back under
the same load, 60 steps each after compilation (`python -m ddx train ... --stop_after_steps=60`),
this model's steps take RATIO_RANGE times the default's; at the upper end a step costs
0.164 s x UPPER = SECONDS_PER_STEP s when quiet, so 4000 steps take about TRAIN_MIN minutes,
plus compilation, two sample grids, checkpoints and two evaluations (about 1000 DDIM steps
over 500 images each): PREDICTED_MIN minutes in all, within the 30-minute budget.
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.model.base_channels = 24
  c.model.num_res_blocks = 2
  c.train.total_steps = 4000
  c.train.checkpoint_every = 1000
  c.train.sample_every = 2000
  c.train.eval_every = 2000
  c.optim.warmup_steps = 300
  c.eval.num = 500
  c.eval.batch = 250
  c.eval.sampler = "ddim"
  c.eval.steps = 50
  return c
