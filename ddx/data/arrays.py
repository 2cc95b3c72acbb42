"""In-memory sources: a held-out split of another source, and arrays computed elsewhere (latents).

Both have the random-access interface of the other sources (``len``, ``[i]``,
``image_shape``, ``num_classes``) and so feed `ddx.data.make_batches` unchanged.
"""

from __future__ import annotations

import numpy as np


class ArraySource:
  """``source[i] = {"image": images[i], "label": labels[i]}`` over in-memory arrays.

  Args:
    images: float32 [N, H, W, C] (any range: latents are not in [-1, 1]).
    labels: int [N].
    num_classes: the number of classes the labels come from.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if images.ndim != 4:
      raise ValueError(f"images: expected [N, H, W, C], got shape {images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels: expected shape ({images.shape[0]},), got {labels.shape}")
    if len(images) < 1:
      raise ValueError("images: at least one example is needed")
    self._images, self._labels = images, labels
    self._images.setflags(write=False)
    self._labels.setflags(write=False)
    self._num_classes = int(num_classes)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self._images.shape[1:])

  @property
  def num_classes(self) -> int:
    return self._num_classes

  @property
  def images(self) -> np.ndarray:
    return self._images

  @property
  def labels(self) -> np.ndarray:
    return self._labels

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    i = int(record_key)
    return {"image": self._images[i].copy(), "label": self._labels[i].copy()}

  def __repr__(self) -> str:
    return f"ArraySource(n={len(self)}, image_shape={self.image_shape})"


def holdout_split(source, num_holdout: int) -> tuple[ArraySource, ArraySource]:
  """``(train, held_out)``: the last ``num_holdout`` records of ``source`` (in its own order)
  are held out, the others train. Deterministic; no record is in both."""
  n = len(source)
  if isinstance(num_holdout, bool) or not isinstance(num_holdout, (int, np.integer)) or not 0 < num_holdout < n:
    raise ValueError(
      f"num_holdout: must be an integer in [1, {n - 1}] (the source has {n} records), got {num_holdout!r}"
    )
  ex = [source[i] for i in range(n)]
  images = np.stack([e["image"] for e in ex])
  labels = np.asarray([e["label"] for e in ex], np.int32)
  k = n - int(num_holdout)
  return (
    ArraySource(images[:k], labels[:k], source.num_classes),
    ArraySource(images[k:], labels[k:], source.num_classes),
  )
