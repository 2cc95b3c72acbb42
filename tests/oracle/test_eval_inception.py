"""The NNX FID Inception against pytorch-fid's own torch module (``pytorch_fid.inception``),
both holding the same seeded random weights and random BatchNorm statistics (the official
weights are never downloaded here): pool3 features including the resize from 32x32, the FD
of two image sets, and the weight-file handling (.pth via torch.load(weights_only=True),
.safetensors copy, hash check, missing file)."""

from unittest import mock

import jax
import numpy as np
import pytest

from ddx import eval as ev
from ddx.eval import features as feat_lib
from ddx.eval import inception

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _import_pytorch_fid():
  """``pytorch_fid.inception`` (its Inception3 blocks come from torchvision, which imports here
  through tests/_torchvision_compat.py, installed by conftest.py)."""
  pytest.importorskip("torchvision")
  return pytest.importorskip("pytorch_fid.inception")


@pytest.fixture(scope="module")
def reference():
  """(pytorch-fid InceptionV3 for pool3 with random weights, its Inception3 state dict)."""
  pi = _import_pytorch_fid()
  import torchvision

  built = {}
  build = pi.fid_inception_v3

  def capture():
    net = build()
    built["inception"] = net
    return net

  # pytorch-fid's own builder, with the weight download replaced by "no weights": the
  # architecture (torchvision Inception3 + FIDInceptionA/C/E_1/E_2) is exactly pytorch-fid's.
  with (
    mock.patch.object(pi, "load_state_dict_from_url", lambda *a, **k: None),
    mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None),
    mock.patch.object(pi, "fid_inception_v3", capture),
  ):
    model = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  net = built["inception"]
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=gen))
        m.bias.copy_(0.1 * torch.randn(c, generator=gen))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
      elif isinstance(m, torch.nn.Linear):
        m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=gen))
  model.eval()
  return model, net.state_dict()


@pytest.fixture(scope="module")
def pth_file(reference, tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
  torch.save(reference[1], path)
  return str(path)


@pytest.fixture(scope="module")
def safetensors_file(pth_file, tmp_path_factory):
  return inception.convert(pth_file, str(tmp_path_factory.mktemp("st") / "fid.safetensors"), sha256_prefix=None)


@pytest.fixture(scope="module")
def ours(safetensors_file):
  return inception.load(safetensors_file, sha256_prefix=None)


def _images(seed, n=2, size=32):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _torch_features(model, images):
  x = torch.from_numpy((images.transpose(0, 3, 1, 2) + 1.0) / 2.0)  # pytorch-fid takes [0, 1] NCHW
  with torch.no_grad():
    return model(x)[0][:, :, 0, 0].double().numpy()


def _rel(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_resize_matches_torch_interpolate():
  F = torch.nn.functional
  for h, w, size in ((32, 32, 299), (8, 13, 299), (400, 350, 299), (7, 5, 3)):
    x = np.random.default_rng(h * w).normal(size=(2, h, w, 3)).astype(np.float32)
    ref = (
      F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(size, size), mode="bilinear", align_corners=False)
      .numpy()
      .transpose(0, 2, 3, 1)
    )
    got = np.asarray(inception.resize_bilinear(jax.numpy.asarray(x), size))
    assert np.abs(got - ref).max() < 1e-5, (h, w, size, np.abs(got - ref).max())


@pytest.mark.slow
def test_features_and_fd_match_pytorch_fid(reference, ours):
  model, _ = reference
  a, b = _images(1), _images(2)
  ref_a, ref_b = _torch_features(model, a), _torch_features(model, b)
  got = feat_lib.compute_features(ours, np.concatenate([a, b]), batch_size=4)
  assert got.shape == (4, 2048)
  assert np.abs(ref_a).max() > 1e-2 and np.std(ref_a) > 1e-3  # the random network is not degenerate
  assert _rel(got[:2], ref_a) < 1e-4 and _rel(got[2:], ref_b) < 1e-4, (_rel(got[:2], ref_a), _rel(got[2:], ref_b))
  fd_ref = ev.frechet_distance(ref_a, ref_b)
  fd = ev.frechet_distance(got[:2], got[2:])
  assert fd > 0 and abs(fd - fd_ref) <= 1e-3 * fd_ref, (fd, fd_ref)


@pytest.mark.slow
def test_weight_files(pth_file, safetensors_file, ours, tmp_path):
  # hash check: the random file is not the official one
  with pytest.raises(ValueError, match="expected it to start with 6726825d"):
    inception.read_weights(pth_file)
  sha = inception.sha256_file(pth_file)
  inception.read_weights(pth_file, sha256_prefix=sha[:8])
  # the safetensors copy carries the source hash and holds the same arrays
  st = safetensors_file
  arrays_pth, _ = inception.read_weights(pth_file, sha256_prefix=None)
  arrays_st, sha_st = inception.read_weights(st, sha256_prefix=sha[:8])
  assert sha_st == sha and sorted(arrays_st) == sorted(arrays_pth)
  assert all(np.array_equal(arrays_st[k], arrays_pth[k]) for k in arrays_pth)
  with pytest.raises(ValueError, match="expected it to start with 6726825d"):
    inception.read_weights(st)
  net = inception.load(pth_file, sha256_prefix=None)
  assert net.name == ours.name == f"fid_inception-{sha[:16]}"
  # missing file: one line naming the flag and where the file comes from
  with pytest.raises(ValueError) as e:
    inception.load(str(tmp_path / "nope.pth"))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("inception_weights:") and inception.OFFICIAL_FILE in msg
  assert not (tmp_path / "nope.pth").exists()
  # a state dict of another network is refused by name
  torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, tmp_path / "other.pth")
  with pytest.raises(ValueError, match="missing 'Conv2d_1a_3x3[.]"):
    inception.load(str(tmp_path / "other.pth"), sha256_prefix=None)
