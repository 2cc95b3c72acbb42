"""Let torchvision's pure-Python parts import when its compiled ops cannot load.

pytorch-fid (the FID Inception oracle) and transformers import torchvision. On PyPI,
torchvision is built against CUDA torch; beside the CPU build of torch its ``_C`` extension
does not load (``libc10_cuda.so`` is missing), and its import then crashes while registering
fake kernels for the ``nms``/``qnms`` ops whose schemas the extension would have defined.
`install` adds an import hook that, on the first ``import torchvision``, defines those two
schemas if and only if the extension cannot be loaded. Nothing changes where it loads.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_SCHEMAS = {
  "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
  "qnms": "(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}


def _extension_loads(spec) -> bool:
  import ctypes
  import glob
  import os

  import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (loads libtorch first)

  for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
    try:
      ctypes.CDLL(path)
    except OSError:
      return False
  return True


class _Hook(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name != "torchvision":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.origin and not _extension_loads(spec):
      import torch

      for op, schema in _SCHEMAS.items():
        try:
          torch.library.define(f"torchvision::{op}", schema)
        except RuntimeError:  # already defined
          pass
    return spec


def install() -> None:
  if "torchvision" not in sys.modules and not any(isinstance(h, _Hook) for h in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
