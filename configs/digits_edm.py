"""The embedded digits with EDM's preconditioning and noise distribution (Karras et al. 2022)
instead of DDPM's: the network of configs/digits.py is trained as D(x; σ) with ln σ ~
N(-1.2, 1.2²) and σ_d = 0.5; sampled with edm_heun (EDM's 2nd-order sampler).

    python -m ddx train --config=configs/digits_edm.py --workdir=runs/digits_edm
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.diffusion.kind = "edm"
  c.diffusion.edm_sigma_data = 0.5
  c.diffusion.edm_p_mean = -1.2
  c.diffusion.edm_p_std = 1.2
  c.sample.sampler = "edm_heun"
  c.sample.steps = 18
  c.eval.sampler = "edm_heun"
  c.eval.steps = 18
  return c
