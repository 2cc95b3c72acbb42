"""Embedded default data set: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 8x8 grey images (values 0..16, 10
classes) inside the scikit-learn wheel, so this source works offline and needs
no preparation step. It is the default data set for smoke runs and tests.

The whole set is converted once at construction: values are mapped linearly
``0..16 -> [-1, 1]`` and, when ``image_size`` is given, resized bilinearly
(antialiased, see ``ddx.data.image_ops.resize``). Indexing afterwards is a copy
out of an in-memory array, so it is cheap and safe to call from any thread or
worker process (the source pickles as two numpy arrays).
"""

from __future__ import annotations

import numpy as np

from ddx.data import image_ops
from ddx.data.arrays import ArraySource

NUM_EXAMPLES = 1797
NATIVE_SIZE = 8
NUM_CLASSES = 10
_MAX_VALUE = 16.0

SPLITS = ("train", "all")


class DigitsSource(ArraySource):
  """Random-access source over sklearn's digits (grain ``RandomAccessDataSource``).

  ``source[i]`` is ``{"image": float32 [H, W, 1] in [-1, 1], "label": int32}``.

  Args:
    image_size: side of the square output images; ``None`` keeps the native 8.
    split: ``"train"`` or ``"all"``: both are the full 1797 images (the set is
      too small to hold out data; evaluation compares against the same set).
  """

  def __init__(self, *, image_size: int | None = None, split: str = "train"):
    image_size = image_ops.check_image_size(image_size)
    if split not in SPLITS:
      raise ValueError(f"split: must be one of {SPLITS} for digits, got {split!r}")

    # sklearn.datasets takes about a second to import: only a run on the digits pays it
    from sklearn.datasets import load_digits  # noqa: PLC0415

    bunch = load_digits()
    images = np.asarray(bunch.images, np.float32) * np.float32(2.0 / _MAX_VALUE) - 1.0
    images = images[..., None]  # [N, 8, 8, 1]
    if image_size is not None and image_size != NATIVE_SIZE:
      images = np.stack([image_ops.resize(im, image_size) for im in images])
    super().__init__(np.clip(images, -1.0, 1.0), bunch.target, NUM_CLASSES)
    self.split = split
    self.image_size = int(self._images.shape[1])

  def __repr__(self) -> str:
    return f"DigitsSource(split={self.split!r}, image_shape={self.image_shape})"
