"""Small numpy/PIL image helpers shared by the data sources.

All images in ``ddx.data`` are float32 ``[H, W, C]`` arrays in ``[-1, 1]``.
Resizing is bilinear through PIL (antialiased when shrinking: PIL widens the
filter support by the reduction factor), done per channel in float mode ``F`` so
it works for any channel count and never rounds to uint8.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def check_image_size(image_size, *, name: str = "image_size") -> int | None:
  """Validates an optional square image side; returns it as an int or None."""
  if image_size is None:
    return None
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
    raise ValueError(f"{name}: must be a positive int or None, got {image_size!r}")
  if not 1 <= int(image_size) <= 4096:
    raise ValueError(f"{name}: must be in [1, 4096], got {image_size!r}")
  return int(image_size)


def uint8_to_float(image: np.ndarray) -> np.ndarray:
  """Maps uint8 values 0..255 (any shape) to float32 in [-1, 1]."""
  return np.asarray(image, np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def ensure_hwc(image: np.ndarray) -> np.ndarray:
  """Adds a trailing channel axis to a 2-D image."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f"image: must be [H, W] or [H, W, C], got shape {image.shape}")
  return image


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Crops the centered ``size x size`` square of an ``[H, W, C]`` image."""
  h, w = image.shape[:2]
  if size > h or size > w:
    raise ValueError(f"center_crop={size} is larger than the image ({h}x{w})")
  top = (h - size) // 2
  left = (w - size) // 2
  return image[top : top + size, left : left + size]


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased) resize of a float ``[H, W, C]`` image to ``size x size``."""
  image = np.asarray(image, np.float32)
  if image.shape[0] == size and image.shape[1] == size:
    return image
  channels = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(image[:, :, c])).resize((size, size), resample=Image.Resampling.BILINEAR),
      np.float32,
    )
    for c in range(image.shape[2])
  ]
  return np.stack(channels, axis=-1)
