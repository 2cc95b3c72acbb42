"""The FID Inception network in Flax NNX: pytorch-fid's InceptionV3 (the TensorFlow FID graph
``inception-2015-12-05``) up to the 2048-d pool3 features, ported layer by layer.

What makes it the FID network rather than torchvision's Inception v3 (all reproduced here):

* input: bilinear resize to 299x299 with ``align_corners=False`` and no antialiasing
  (``torch.nn.functional.interpolate``'s arithmetic: source coordinate
  ``(i + 0.5) * in / out - 0.5``, clamped at 0), then values in [-1, 1];
* Mixed_5b-d, Mixed_6b-e and Mixed_7b average-pool their pool branch with padding excluded
  from the count (TensorFlow's ``avg_pool``; torchvision counts the zeros);
* Mixed_7c pools that branch with a 3x3 *max* pool (stride 1, padding 1);
* BasicConv = conv without bias -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

Layout is NHWC with HWIO kernels. Parameter paths mirror the torch state-dict keys of
``pytorch_fid.inception.fid_inception_v3()`` (``Mixed_6b.branch7x7_2.conv.weight`` ...), so
loading is a transpose per convolution. The classifier (``fc``) is not used for features and
is not loaded.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid's GitHub release (the
hash in the name is the first 8 hex digits of the file's sha256). ddx never downloads it:
pass the path of a copy you have. ``.pth`` files are read with
``torch.load(weights_only=True)`` (torch is optional); ``convert`` writes a ``.safetensors``
copy once, so later runs need no torch:

    python -m ddx.eval.inception convert pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors
"""

from __future__ import annotations

import hashlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ddx.eval.features import FeatureNet

OFFICIAL_FILE = "pt_inception-2015-12-05-6726825d.pth"
OFFICIAL_SHA256_PREFIX = "6726825d"
OFFICIAL_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + OFFICIAL_FILE
INPUT_SIZE = 299
FEATURE_DIM = 2048
_BN_EPS = 1e-3

Array = jax.Array


# --- input resize ------------------------------------------------------------------------


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of 1-D bilinear interpolation, ``align_corners=False``, no antialias.

  The source coordinate ``scale * (i + 0.5) - 0.5`` (clamped at 0) and the interpolation
  weight are computed in float32 like torch's ``upsample_bilinear2d`` on float32 input:
  with float64 arithmetic instead, a 1000 -> 299 resize already differs from torch by 3e-4.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  l1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(np.float64)
  w = np.zeros((out_size, in_size))
  np.add.at(w, (np.arange(out_size), i0), 1.0 - l1)
  np.add.at(w, (np.arange(out_size), i1), l1)
  return w


def resize_bilinear(x: Array, size: int) -> Array:
  """``[B, H, W, C] -> [B, size, size, C]``, separable bilinear, ``align_corners=False``."""
  wh = jnp.asarray(bilinear_matrix(x.shape[1], size), jnp.float32)
  ww = jnp.asarray(bilinear_matrix(x.shape[2], size), jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hp)
  return jnp.einsum("pw,bowc->bopc", ww, x, precision=hp)


# --- layers ------------------------------------------------------------------------------


def _max_pool(x: Array, stride: int, pad: int) -> Array:
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def _avg_pool_exclude_pad(x: Array) -> Array:
  """3x3, stride 1, padding 1, dividing by the number of non-padding inputs (TensorFlow)."""
  p = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  return total / count


class _Conv(nnx.Module):
  def __init__(self, cin: int, cout: int, kernel: tuple[int, int]):
    self.weight = nnx.Param(jnp.zeros(kernel + (cin, cout), jnp.float32))  # HWIO


class _BatchNorm(nnx.Module):
  def __init__(self, c: int):
    self.weight = nnx.Param(jnp.ones((c,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.running_mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((c,), jnp.float32))


class BasicConv(nnx.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3) with running statistics -> ReLU; NHWC."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.stride = stride
    self.padding = ((padding[0], padding[0]), (padding[1], padding[1]))
    self.conv = _Conv(cin, cout, kernel)
    self.bn = _BatchNorm(cout)

  def __call__(self, x: Array) -> Array:
    y = jax.lax.conv_general_dilated(
      x,
      self.conv.weight[...],
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
    )
    bn = self.bn
    y = (y - bn.running_mean[...]) * jax.lax.rsqrt(bn.running_var[...] + _BN_EPS) * bn.weight[...] + bn.bias[...]
    return jax.nn.relu(y)


class InceptionA(nnx.Module):
  """Mixed_5b/c/d (FID variant: pool branch averages without the padding)."""

  def __init__(self, cin: int, pool_features: int):
    self.branch1x1 = BasicConv(cin, 64, 1)
    self.branch5x5_1 = BasicConv(cin, 48, 1)
    self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
    self.branch_pool = BasicConv(cin, pool_features, 1)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: grid reduction 35 -> 17."""

  def __init__(self, cin: int):
    self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b-e with factorised 7x7 convolutions (FID variant: pool without the padding)."""

  def __init__(self, cin: int, c7: int):
    self.branch1x1 = BasicConv(cin, 192, 1)
    self.branch7x7_1 = BasicConv(cin, c7, 1)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv(cin, 192, 1)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (
      self.branch7x7dbl_1,
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      d = layer(d)
    bp = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, d, bp], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: grid reduction 17 -> 8."""

  def __init__(self, cin: int):
    self.branch3x3_1 = BasicConv(cin, 192, 1)
    self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv(cin, 192, 1)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (average pool without the padding) and Mixed_7c (``max_pool=True``)."""

  def __init__(self, cin: int, max_pool: bool):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv(cin, 320, 1)
    self.branch3x3_1 = BasicConv(cin, 384, 1)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv(cin, 192, 1)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_exclude_pad(x)
    return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's FID InceptionV3 up to pool3. Call: images [B, H, W, 3] in [-1, 1] -> [B, 2048].

  Any input size is resized to 299x299 first (bilinear, ``align_corners=False``).
  pytorch-fid takes [0, 1] and maps it to [-1, 1] after its resize; resizing is linear with
  weights summing to 1, so resizing the [-1, 1] images is the same computation. Parameters
  start at zeros (BatchNorm at identity): load real ones with `load_params`.
  """

  def __init__(self):
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, max_pool=False)
    self.Mixed_7c = InceptionE(2048, max_pool=True)

  def __call__(self, x: Array) -> Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"images: expected [B, H, W, 3], got shape {x.shape}")
    x = resize_bilinear(x.astype(jnp.float32), INPUT_SIZE)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2, 0)
    x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2, 0)
    for block in (
      self.Mixed_5b,
      self.Mixed_5c,
      self.Mixed_5d,
      self.Mixed_6a,
      self.Mixed_6b,
      self.Mixed_6c,
      self.Mixed_6d,
      self.Mixed_6e,
      self.Mixed_7a,
      self.Mixed_7b,
      self.Mixed_7c,
    ):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


# --- weights -----------------------------------------------------------------------------


def missing_file_error(path: str) -> ValueError:
  return ValueError(
    f"inception_weights: no file at {path!r}; ddx never downloads weights: get {OFFICIAL_FILE} (pytorch-fid's "
    f"release, {OFFICIAL_URL}, or its copy in ~/.cache/torch/hub/checkpoints/ on a machine that ran pytorch-fid) "
    "and pass its path"
  )


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _check_sha(path: str, sha: str, prefix: str | None) -> None:
  if prefix is not None and not sha.startswith(prefix.lower()):
    raise ValueError(
      f"inception_weights: sha256 of {path!r} is {sha[:16]}..., expected it to start with "
      f"{prefix} ({OFFICIAL_FILE}); pass sha256_prefix=None to use other weights knowingly"
    )


def read_torch_state_dict(path: str, *, sha256_prefix: str | None = OFFICIAL_SHA256_PREFIX) -> tuple[dict, str]:
  """Read a pytorch-fid ``.pth`` state dict as numpy arrays (``torch.load(weights_only=True)``).

  Returns ``(arrays, sha256 of the file)``; the hash must start with ``sha256_prefix``.
  """
  if not os.path.isfile(path):
    raise missing_file_error(path)
  sha = sha256_file(path)
  _check_sha(path, sha, sha256_prefix)
  try:
    import torch  # noqa: PLC0415 -- optional extra, for reading the .pth file only
  except ImportError:
    raise ValueError(
      f"inception_weights: reading {path!r} needs torch (pip install 'ddx[torch]'); or convert it "
      "once where torch is installed: python -m ddx.eval.inception convert SRC.pth DST.safetensors"
    ) from None
  sd = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}, sha


def convert(pth_path: str, out_path: str, *, sha256_prefix: str | None = OFFICIAL_SHA256_PREFIX) -> str:
  """Write the ``.pth`` weights as ``.safetensors`` (with the source's sha256 in its metadata)."""

  arrays, sha = read_torch_state_dict(pth_path, sha256_prefix=sha256_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + ".tmp"
  save_file(
    {k: np.array(v, order="C") for k, v in arrays.items()},
    tmp,
    metadata={"source_file": os.path.basename(pth_path), "source_sha256": sha},
  )
  os.replace(tmp, out_path)
  return out_path


def read_weights(path: str, *, sha256_prefix: str | None = OFFICIAL_SHA256_PREFIX) -> tuple[dict, str]:
  """``(torch-named numpy arrays, source sha256)`` from a ``.pth`` or a converted ``.safetensors``.

  For a ``.safetensors`` file the hash checked is the one of the ``.pth`` it was converted
  from (stored in its metadata by `convert`), so both forms have the same identity.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise missing_file_error(path)
  if not path.endswith(".safetensors"):
    return read_torch_state_dict(path, sha256_prefix=sha256_prefix)

  with safe_open(path, "np") as f:
    meta = f.metadata() or {}
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  sha = meta.get("source_sha256", "")
  if not sha:
    raise ValueError(
      f"inception_weights: {path!r} has no source_sha256 metadata; write it with "
      "python -m ddx.eval.inception convert SRC.pth DST.safetensors"
    )
  _check_sha(path, sha, sha256_prefix)
  return arrays, sha


def load_params(model: FIDInceptionV3, arrays: dict) -> None:
  """Copy torch-named arrays (``Conv2d_1a_3x3.conv.weight`` [O, I, kh, kw] ...) into ``model``.

  Every conv and BatchNorm variable must be present with its shape; ``fc.*`` and
  ``*.num_batches_tracked`` are ignored; any other key is an error.
  """
  used = set()
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    key = ".".join(str(p) for p in path)
    if key not in arrays:
      raise ValueError(f"inception_weights: missing {key!r} (not a pytorch-fid FID Inception state dict)")
    value = np.asarray(arrays[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.shape != var[...].shape:
      raise ValueError(f"inception_weights: {key!r} has shape {value.shape}, expected {var[...].shape}")
    var[...] = jnp.asarray(value)
    used.add(key)
  extra = [k for k in arrays if k not in used and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
  if extra:
    raise ValueError(f"inception_weights: unexpected key {extra[0]!r} (not a pytorch-fid FID Inception state dict)")


def load(path: str, *, sha256_prefix: str | None = OFFICIAL_SHA256_PREFIX) -> FeatureNet:
  """The FID feature network from a weights file, as a `FeatureNet` (pool3, 2048-d).

  Its ``apply`` takes images [B, H, W, C] in [-1, 1] with C = 3 or 1 (grey images are
  repeated to 3 channels) and returns float32 [B, 2048]. Its name is
  ``fid_inception-<first 16 hex of the .pth sha256>``, the same for the ``.pth`` and its
  ``.safetensors`` copy.
  """
  arrays, sha = read_weights(path, sha256_prefix=sha256_prefix)
  model = FIDInceptionV3()
  load_params(model, arrays)
  return FeatureNet.from_module(f"fid_inception-{sha[:16]}", model, FEATURE_DIM, channels=3)


def main(argv: list[str]) -> int:
  usage = "usage: python -m ddx.eval.inception convert SRC.pth DST.safetensors"
  if len(argv) != 3 or argv[0] != "convert":
    print(usage, file=sys.stderr)
    return 2
  try:
    out = convert(argv[1], argv[2])
  except ValueError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
