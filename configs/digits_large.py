"""A better digits model within 30 minutes on 2 CPU cores: a wider and deeper U-Net trained
longer than the quick default (configs/digits.py stays as it is).

    python -m ddx train --config=configs/digits_large.py --workdir=runs/digits_large

Changes from configs/digits.py: base_channels 16 -> 24 and num_res_blocks 1 -> 2 (0.28M ->
0.92M parameters), total_steps 2400 -> 3000 (107 epochs of the 1797 digits at batch 64),
warmup 200 -> 300, and at the last step the digits FD / KID / precision / recall of 500
DDIM-50 samples (train.eval_every, into metrics.jsonl and TensorBoard).

Time estimate (not a measured full run: the machine was shared with other jobs). The default
runs 2400 steps in 392 s on a quiet 2-core machine (0.164 s a step). Both configs were timed
alternately under the same load, 50-60 steps each after compilation
(``python -m ddx train --config=... --stop_after_steps=60 --config.train.log_every_seconds=2``,
steps/s from metrics.jsonl without the first row): this model's step took 1.43, 2.38, 2.61,
3.34 and 2.35 times the default's in five adjacent pairs (median 2.4; the load changed
between runs). At the median, 3000 steps take 3000 x 0.164 s x 2.4 = 20 min when quiet; at
the worst pair's 3.34, 27 min. Compilation, two sample grids, checkpoints and the final
evaluation (500 images x 50 DDIM steps, about 130 training steps' worth) add about 2-3 min:
22-30 min in all. (A base_channels=32, 1-res-block, 1.1M-parameter variant timed the same way
took 2.3 and 2.0x; which of the two trains the better model was not measured.)
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.model.base_channels = 24
  c.model.num_res_blocks = 2
  c.train.total_steps = 3000
  c.train.checkpoint_every = 1000
  c.train.sample_every = 1500
  c.train.eval_every = 3000
  c.optim.warmup_steps = 300
  c.eval.num = 500
  c.eval.batch = 250
  c.eval.sampler = "ddim"
  c.eval.steps = 50
  return c
