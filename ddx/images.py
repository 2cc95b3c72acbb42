"""Sample images on disk: [-1, 1] float arrays -> uint8 grids, PNG files and .npz archives."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(x) -> np.ndarray:
  """[-1, 1] float [..., H, W, C] -> uint8 [0, 255] (values outside are clipped)."""
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] mosaic."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images: expected [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), images.dtype)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray, scale: int = 1) -> str:
  """Write a uint8 [H, W, C] (C = 1 or 3) grid as PNG, optionally upscaled (nearest)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = grid[..., 0] if grid.shape[-1] == 1 else grid
  im = Image.fromarray(img)
  if scale > 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  im.save(path)
  return path


def save_samples(path_prefix: str, samples, labels=None, ncols: int | None = None, scale: int = 1) -> tuple[str, str]:
  """Write ``<prefix>.png`` (a grid) and ``<prefix>.npz`` (float samples in [-1, 1], labels).

  Refuses (ValueError, nothing written) samples with a NaN or an infinity: they would show as
  plausible-looking black or white pixels.
  """
  samples = np.asarray(samples, np.float32)
  bad = int(samples.size - np.count_nonzero(np.isfinite(samples)))
  if bad:
    raise ValueError(f"samples: {bad} of {samples.size} values are not finite; nothing written to {path_prefix}.*")
  png = save_png(path_prefix + ".png", make_grid(to_uint8(samples), ncols), scale=scale)
  arrays = {"samples": samples}
  if labels is not None:
    arrays["labels"] = np.asarray(labels)
  np.savez_compressed(path_prefix + ".npz", **arrays)
  return png, path_prefix + ".npz"
