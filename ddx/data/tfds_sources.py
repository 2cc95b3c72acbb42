"""TFDS image data sets read as random-access ArrayRecord sources (no TensorFlow).

Supported names (``TFDS_DATASETS``)::

    name            TFDS name                       native    label
    mnist           mnist                           28x28x1   class 0..9
    fashion_mnist   fashion_mnist                   28x28x1   class 0..9
    cifar10         cifar10                         32x32x3   class 0..9
    celeb_a         celeb_a                         218x178x3 none -> 0
    imagenet32      downsampled_imagenet/32x32      32x32x3   none -> 0
    imagenet64      downsampled_imagenet/64x64      64x64x3   none -> 0

Every example becomes ``{"image": float32 [H, W, C] in [-1, 1], "label": int32}``
(uint8 ``v`` -> ``v / 127.5 - 1``). Data sets without labels give label 0 and
``num_classes == 1``. celeb_a is center-cropped to 140x140 first (as in the
score-SDE / NCSN++ CelebA setup), then resized; any other non-square image is
center-cropped to its shorter side before resizing. Resizing is bilinear and
antialiased (``ddx.data.image_ops.resize``), done per example at read time.

One-time prepare step
---------------------
At run time the data are read with ``tfds.data_source(..., download=False)``,
which needs only the ArrayRecord files, not TensorFlow. Those files must be
written once, on a machine with network access and TensorFlow installed
(``pip install tensorflow``; TFDS uses it to build data sets)::

    python -m ddx.data.tfds_sources mnist cifar10 --data_dir /path/to/tfds

or from Python ``ddx.data.tfds_sources.prepare("mnist", data_dir=...)``, which
calls ``tfds.builder(name, data_dir=...).download_and_prepare(
file_format="array_record")``. celeb_a's files come from Google Drive and are
often rate-limited; downsampled_imagenet needs a manual download (see its TFDS
page). Copy the resulting ``data_dir`` to the training machines and pass it as
``data_dir`` (or set ``TFDS_DATA_DIR``). A data dir prepared in the default
TFRecord format can not be read here: prepare it again with array_record.

Offline tests use ``tfds.testing.mock_data(num_examples=...,
policy=tfds.testing.MockPolicy.USE_CODE)``, under which ``tfds.data_source``
returns random examples with the right feature shapes. Under that mock every
split string gives the same ``num_examples`` examples.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import numpy as np

from ddx.data import image_ops


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How one TFDS data set maps to the ddx example format."""

  tfds_name: str
  native_shape: tuple[int, int, int]
  label_key: str | None
  num_classes: int
  center_crop: int | None = None


TFDS_DATASETS: dict[str, TfdsSpec] = {
  "mnist": TfdsSpec("mnist", (28, 28, 1), "label", 10),
  "fashion_mnist": TfdsSpec("fashion_mnist", (28, 28, 1), "label", 10),
  "cifar10": TfdsSpec("cifar10", (32, 32, 3), "label", 10),
  "celeb_a": TfdsSpec("celeb_a", (218, 178, 3), None, 1, center_crop=140),
  "imagenet32": TfdsSpec("downsampled_imagenet/32x32", (32, 32, 3), None, 1),
  "imagenet64": TfdsSpec("downsampled_imagenet/64x64", (64, 64, 3), None, 1),
}


def get_spec(name: str) -> TfdsSpec:
  if name not in TFDS_DATASETS:
    raise ValueError(f"name: must be one of {sorted(TFDS_DATASETS)}, got {name!r}")
  return TFDS_DATASETS[name]


class TfdsImageSource:
  """Random-access source over a prepared TFDS ArrayRecord data set.

  Implements grain's ``RandomAccessDataSource`` protocol (``__len__``,
  ``__getitem__``); ``source[i]`` is ``{"image": float32 [S, S, C] in [-1, 1],
  "label": int32}`` with ``S = image_size`` (or the native/cropped side).

  Args:
    name: a key of ``TFDS_DATASETS``.
    split: a TFDS split string, e.g. ``"train"``, ``"test"``, ``"train[:90%]"``.
    data_dir: TFDS data dir holding the prepared ArrayRecord files (``None``:
      TFDS default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    image_size: output side; ``None`` keeps the native (cropped) side.
    center_crop: side of the centered square cropped before resizing;
      ``None`` uses the data set's default (140 for celeb_a, else none).
  """

  def __init__(
    self,
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int | None = None,
    center_crop: int | None = None,
  ):
    self.spec = spec = get_spec(name)
    if not isinstance(split, str) or not split:
      raise ValueError(f"split: must be a non-empty TFDS split string, got {split!r}")
    image_size = image_ops.check_image_size(image_size)
    crop = image_ops.check_image_size(center_crop, name="center_crop")
    if crop is None:
      crop = spec.center_crop
    native_h, native_w, channels = spec.native_shape
    if crop is not None and crop > min(native_h, native_w):
      raise ValueError(f"center_crop: must be <= {min(native_h, native_w)} for {name}, got {crop}")
    side = crop if crop is not None else native_h
    if crop is None and native_h != native_w:
      side = min(native_h, native_w)
    self.name = name
    self.split = split
    self.data_dir = None if data_dir is None else str(data_dir)
    self.center_crop = crop
    self.image_size = image_size if image_size is not None else side
    self._channels = channels
    self._ds = self._open()
    self._len = len(self._ds)

  def _open(self):
    import tensorflow_datasets as tfds  # noqa: PLC0415 -- seconds to import; only runs on a tfds dataset need it

    try:
      return tfds.data_source(
        self.spec.tfds_name,
        split=self.split,
        data_dir=self.data_dir,
        download=False,
      )
    except (NotImplementedError, FileNotFoundError) as e:
      raise FileNotFoundError(
        f"no ArrayRecord data for {self.spec.tfds_name!r} in data_dir="
        f"{self.data_dir!r}; prepare it once with `python -m "
        f"ddx.data.tfds_sources {self.name} --data_dir DIR` "
        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
      ) from e

  # Pickling (grain worker processes): ship the arguments, reopen lazily.
  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self._channels)

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  def __len__(self) -> int:
    return self._len

  def convert(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    """Maps one raw TFDS example to the ddx example format."""
    image = image_ops.ensure_hwc(example["image"])
    if self.center_crop is not None:
      image = image_ops.center_crop(image, self.center_crop)
    elif image.shape[0] != image.shape[1]:
      image = image_ops.center_crop(image, min(image.shape[:2]))
    image = image_ops.uint8_to_float(image)
    image = image_ops.resize(image, self.image_size)
    if self.spec.label_key is None:
      label = np.int32(0)
    else:
      label = np.int32(example[self.spec.label_key])
    return {"image": np.clip(image, -1.0, 1.0), "label": label}

  def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
    if self._ds is None:
      self._ds = self._open()
    return self.convert(self._ds[int(record_key)])

  def __repr__(self) -> str:
    return f"TfdsImageSource({self.name!r}, split={self.split!r}, image_shape={self.image_shape})"


def prepare(name: str, *, data_dir: str | None = None) -> None:
  """Downloads and writes ``name`` as ArrayRecord files (needs network + TF)."""
  spec = get_spec(name)
  import tensorflow_datasets as tfds  # noqa: PLC0415 -- seconds to import; only runs on a tfds dataset need it

  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")


def main(argv: list[str] | None = None) -> None:

  parser = argparse.ArgumentParser(
    prog="python -m ddx.data.tfds_sources",
    description="One-time prepare of TFDS data sets as ArrayRecord files.",
  )
  parser.add_argument("names", nargs="+", choices=sorted(TFDS_DATASETS))
  parser.add_argument("--data_dir", default=None, help="TFDS data dir to write")
  args = parser.parse_args(argv)
  for name in args.names:
    prepare(name, data_dir=args.data_dir)
    print(f"prepared {name} ({TFDS_DATASETS[name].tfds_name}) as array_record")


if __name__ == "__main__":
  main()
