"""Class-conditional digits with label dropout, for classifier-free guidance.

python -m ddx train --config=configs/digits_cfg.py --workdir=runs/digits_cfg
python -m ddx sample --workdir=runs/digits_cfg --label=3 --guidance=2.0
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.model.num_classes = 10
  c.train.label_dropout = 0.1
  c.sample.guidance = 2.0
  return c
