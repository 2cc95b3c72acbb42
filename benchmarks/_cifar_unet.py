"""The model both speed benchmarks (unet_forward.py, vs_pytorch.py) run: the diffusers
UNet2DModel configuration of google/ddpm-cifar10-32 (35.7M parameters) with seeded random
weights, and fixed inputs. Nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np

CIFAR10 = dict(
  sample_size=32,
  in_channels=3,
  out_channels=3,
  block_out_channels=(128, 256, 256, 256),
  layers_per_block=2,
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  attention_head_dim=None,
  norm_eps=1e-6,
  norm_num_groups=32,
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
)


def write_fixture(folder: str, batch: int) -> int:
  """Save the model to ``folder/unet`` and the inputs to ``folder/inputs.npz`` (``x``, ``t``,
  ``x0`` in [-1, 1], ``xT``: batch × 3 × 32 × 32, NCHW); returns the parameter count."""
  import torch
  from diffusers import UNet2DModel

  torch.manual_seed(0)
  model = UNet2DModel(**CIFAR10)
  n_params = sum(p.numel() for p in model.parameters())
  model.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
  rng = np.random.RandomState(0)
  np.savez(
    os.path.join(folder, "inputs.npz"),
    x=rng.randn(batch, 3, 32, 32).astype(np.float32),
    t=rng.randint(0, 1000, batch).astype(np.int64),
    x0=np.clip(rng.randn(batch, 3, 32, 32) * 0.5, -1, 1).astype(np.float32),
    xT=rng.randn(batch, 3, 32, 32).astype(np.float32),
  )
  return n_params
