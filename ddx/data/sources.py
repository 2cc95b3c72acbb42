"""``make_source``: one factory for every data set, with explicit arguments."""

from __future__ import annotations

from ddx.data import digits as digits_lib
from ddx.data import tfds_sources

DATASETS = ("digits",) + tuple(tfds_sources.TFDS_DATASETS)


def make_source(
  name: str,
  *,
  split: str = "train",
  data_dir: str | None = None,
  image_size: int | None = None,
  center_crop: int | None = None,
):
  """Random-access source of ``{"image": float32 [H,W,C] in [-1,1], "label": int32}``.

  Args:
    name: ``"digits"`` (embedded sklearn digits, offline, no preparation) or a
      TFDS data set of ``ddx.data.tfds_sources.TFDS_DATASETS`` (``"mnist"``,
      ``"fashion_mnist"``, ``"cifar10"``, ``"celeb_a"``, ``"imagenet32"``,
      ``"imagenet64"``), read from prepared ArrayRecord files.
    split: ``"train"``/``"all"`` for digits (both the full set); a TFDS split
      string otherwise.
    data_dir: TFDS data dir (ignored, and must be None, for digits).
    image_size: output square side; ``None`` keeps the native side.
    center_crop: TFDS only: centered square cropped before resizing.

  The returned source has ``len``, ``[i]``, ``image_shape`` and
  ``num_classes``. Raises ``ValueError`` naming the bad argument.
  """
  if not isinstance(name, str) or name not in DATASETS:
    raise ValueError(f"name: must be one of {DATASETS}, got {name!r}")
  if name == "digits":
    if data_dir is not None:
      raise ValueError(f"data_dir: must be None for digits, got {data_dir!r}")
    if center_crop is not None:
      raise ValueError(f"center_crop: must be None for digits, got {center_crop!r}")
    return digits_lib.DigitsSource(image_size=image_size, split=split)
  return tfds_sources.TfdsImageSource(
    name,
    split=split,
    data_dir=data_dir,
    image_size=image_size,
    center_crop=center_crop,
  )
