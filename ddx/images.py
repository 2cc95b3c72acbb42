"""Sample images on disk: [-1, 1] float arrays -> uint8 grids, PNG files and .npz archives."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ddx import storage


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
    grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray, scale: int = 1) -> str:
  """Write a uint8 [H, W, C] (C = 1 or 3) grid as PNG, optionally upscaled (nearest), to a
  local or object-store path (atomically); returns the path."""
  img = grid[..., 0] if grid.shape[-1] == 1 else grid
  im = Image.fromarray(img)
  if scale > 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return storage.write_bytes(path, buf.getvalue())


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
  return png, storage.save_npz(path_prefix + ".npz", **arrays)


def _open(path: str, what: str) -> Image.Image:
  """A lazily decoded PIL image of a local or object-store file (ValueError naming ``what``)."""
  try:
    if not storage.isfile(path):
      raise ValueError(f"{what}: no such file {path!r}")
    data = storage.read_bytes(path)
  except OSError as e:
    raise ValueError(f"{what}: cannot read {path!r} ({e.strerror or type(e).__name__})") from None
  try:
    return Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises several types for a bad file; one line with the cause
    raise ValueError(f"{what}: cannot read {path!r} as an image ({type(e).__name__})") from None


def load_png(path: str, size: int | tuple[int, int], channels: int, what: str = "--input") -> np.ndarray:
  """Read a PNG as float32 [size, size, channels] in [-1, 1] (uint8 0..255 mapped linearly);
  ``size`` may be ``(height, width)`` for a non-square image.

  ``channels`` 1 takes a greyscale PNG (mode L), 3 an RGB one. A file of another size or
  colour mode is an error naming ``what`` (no silent resize or conversion).
  """
  im = _open(path, what)
  try:
    im.load()
  except Exception as e:  # PIL raises several types for a bad file; one line with the cause
    raise ValueError(f"{what}: cannot read {path!r} as an image ({type(e).__name__})") from None
  want = {1: ("L",), 3: ("RGB",)}.get(channels)
  if want is None:
    raise ValueError(f"channels: must be 1 or 3, got {channels}")
  if im.mode not in want:
    raise ValueError(
      f"{what}: {path} has mode {im.mode} ({len(im.getbands())} channels), the model takes "
      f"{channels} channel{'s' if channels > 1 else ''} (mode {want[0]})"
    )
  h, w = (size, size) if isinstance(size, (int, np.integer)) else size
  if im.size != (w, h):
    raise ValueError(f"{what}: {path} is {im.size[0]}x{im.size[1]}, the model takes {w}x{h}")
  x = np.asarray(im, np.float32).reshape(h, w, channels)
  return x / 127.5 - 1.0


def png_size(path: str, what: str = "--input") -> tuple[int, int]:
  """``(height, width)`` of an image file, read from its header."""
  im = _open(path, what)
  try:
    with im:
      return im.size[1], im.size[0]
  except Exception as e:  # PIL raises several types for a bad file; one line with the cause
    raise ValueError(f"{what}: cannot read {path!r} as an image ({type(e).__name__})") from None


def load_mask(path: str, size: int | tuple[int, int], channels: int, what: str = "--mask") -> np.ndarray:
  """A binary mask PNG (greyscale, 0 = fill, 255 = keep) as float32 [size, size, channels] of 0/1
  (``size`` as in `load_png`)."""
  m = load_png(path, size, 1, what)
  u = np.unique(m)
  if not np.all(np.isin(u, (-1.0, 1.0))):
    raise ValueError(f"{what}: {path} must be binary (0 = fill, 255 = keep), got {len(u)} distinct grey levels")
  return np.repeat((m > 0).astype(np.float32), channels, axis=-1)
