"""The embedded digits with flow matching (rectified flow) instead of noise prediction: the
model of configs/digits.py regresses the velocity eps - x0 on x = (1 - σ) x0 + σ eps, with
SD3's logit-normal σ; sampled with flow_euler.

    python -m ddx train --config=configs/digits_flow.py --workdir=runs/digits_flow
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.diffusion.kind = "flow"
  c.diffusion.flow_timesteps = "logit_normal"
  c.diffusion.flow_logit_mean = 0.0
  c.diffusion.flow_logit_std = 1.0
  c.diffusion.flow_shift = 1.0
  c.sample.sampler = "flow_euler"
  c.sample.steps = 50
  c.eval.sampler = "flow_euler"
  return c
