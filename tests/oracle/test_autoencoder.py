"""ddx.models.AutoencoderKL vs diffusers' AutoencoderKL (seeded random tiny models) and its importer."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddx.models import AutoencoderKL, DiagonalGaussian, autoencoder_from_diffusers
from tests._latent_refs import refs, save_perturbed
from tests._tiny import numpy_init

TINY = dict(
  in_channels=3,
  out_channels=3,
  block_out_channels=(8, 16),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=4,
  sample_size=16,
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def make_vae(path, seed=0, **changes):
  """A random diffusers AutoencoderKL (biases / norm affines perturbed too) saved to ``path``."""
  torch, diffusers, _ = refs()
  torch.manual_seed(seed)
  return save_perturbed(diffusers.AutoencoderKL(**{**TINY, **changes}), path)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x):
  post = nnx.merge(graphdef, state).encode(x)
  return post.mean, post.logvar


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(graphdef, state, z, scaled):
  return nnx.merge(graphdef, state).decode(z, scaled=scaled)


@functools.partial(jax.jit, static_argnums=0)
def _recon(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


@pytest.mark.torch
@pytest.mark.parametrize(
  "changes",
  [
    {},
    dict(
      use_quant_conv=False,
      use_post_quant_conv=False,
      mid_block_add_attention=False,
      shift_factor=0.1,
      scaling_factor=0.5,
      layers_per_block=2,
    ),
  ],
  ids=["sd", "no_quant_shift"],
)
@pytest.mark.slow
def test_matches_diffusers(tmp_path, changes):
  import torch

  tmodel = make_vae(tmp_path, **changes)
  vae = autoencoder_from_diffusers(str(tmp_path))
  rng = np.random.RandomState(0)
  x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  with torch.inference_mode():
    dist = tmodel.encode(torch.from_numpy(x)).latent_dist
    z = dist.sample(generator=torch.Generator().manual_seed(0))
    ref_dec = tmodel.decode(z).sample.numpy()
    ref_mean, ref_logvar, z = dist.mean.numpy(), dist.logvar.numpy(), z.numpy()
  graphdef, state = nnx.split(vae)
  mean, logvar = _encode(graphdef, state, nhwc(x))
  assert rel_err(nchw(mean), ref_mean) < 1e-5
  assert rel_err(nchw(logvar), ref_logvar) < 1e-5
  # decode takes scaled latents (z - shift) * scale and unscales them first
  shift, scale = changes.get("shift_factor", 0.0), changes.get("scaling_factor", 0.18215)
  zs = (z - shift) * scale
  assert rel_err(nchw(_decode(graphdef, state, nhwc(zs), True)), ref_dec) < 1e-5
  np.testing.assert_allclose(vae.scale_latents(jnp.asarray(z)), zs, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(vae.unscale_latents(jnp.asarray(zs)), z, rtol=1e-5, atol=1e-6)


def test_posterior_clamp_sample_and_kl():
  vae = numpy_init(lambda: AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, rngs=nnx.Rngs(0)))
  mean = jnp.zeros((1, 2, 2, 4))
  post = DiagonalGaussian(mean, jnp.full_like(mean, 0.5))
  s = post.sample(jax.random.key(1))
  np.testing.assert_allclose(s, jnp.exp(0.25) * jax.random.normal(jax.random.key(1), mean.shape), rtol=1e-6)
  np.testing.assert_allclose(post.kl(), 16 * 0.5 * (np.exp(0.5) - 1 - 0.5), rtol=1e-6)
  # the clamp: a huge conv_out bias drives logvar beyond 20
  vae.encoder.conv_out.bias[...] = jnp.full((8,), 1e3)
  if vae.quant_conv is not None:
    vae.quant_conv.kernel[...] = jnp.eye(8)[None, None]
    vae.quant_conv.bias[...] = jnp.zeros((8,))
  _, logvar = _encode(*nnx.split(vae), jnp.zeros((1, 4, 4, 3)))
  assert float(logvar.max()) == 20.0


def test_bfloat16_compute_close_to_float32():
  vae = numpy_init(lambda: AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, rngs=nnx.Rngs(0)))
  bf = numpy_init(lambda: AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, dtype="bfloat16", rngs=nnx.Rngs(0)))
  x = jax.random.uniform(jax.random.key(0), (1, 4, 4, 3), minval=-1, maxval=1)
  a, b = _recon(*nnx.split(vae), x), _recon(*nnx.split(bf), x)
  assert b.dtype == jnp.float32 and a.shape == b.shape == (1, 4, 4, 3)
  assert rel_err(b, a) < 5e-2


def test_bad_inputs():
  vae = nnx.eval_shape(lambda: AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"^x: height and width must be divisible by 2"):
    vae.encode(jnp.zeros((1, 5, 8, 3)))
  with pytest.raises(ValueError, match=r"^x: expected images \[B, H, W, 3\]"):
    vae.encode(jnp.zeros((1, 8, 8, 4)))
  with pytest.raises(ValueError, match=r"^z: expected latents \[B, h, w, 4\]"):
    vae.decode(jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="^norm_num_groups: 3 does not divide 8 channels$"):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="^scaling_factor: "):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, scaling_factor=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="^dtype: "):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, dtype="int8", rngs=nnx.Rngs(0))


def _write(path, **changes):
  cfg = {"_class_name": "AutoencoderKL", **TINY, **changes}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(path)


@pytest.mark.parametrize(
  "changes,key",
  [
    (dict(act_fn="gelu"), "act_fn"),
    (dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")), "down_block_types"),
    (dict(up_block_types=("UpDecoderBlock2D",)), "up_block_types"),
    (dict(latents_mean=[0.0] * 4), "latents_mean"),
    (dict(some_new_option=1), "some_new_option"),
    (dict(_class_name="VQModel"), "_class_name"),
  ],
)
def test_unsupported_config(tmp_path, changes, key):
  with pytest.raises(ValueError, match=f"^{key}: unsupported diffusers AutoencoderKL config") as e:
    autoencoder_from_diffusers(_write(tmp_path, **changes))
  assert "\n" not in str(e.value)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="^vae: missing weights file"):
    autoencoder_from_diffusers(_write(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match="^vae: no config.json in"):
    autoencoder_from_diffusers(str(tmp_path))


@pytest.mark.torch
def test_bad_tensors_and_legacy_names(tmp_path):
  from safetensors.numpy import load_file, save_file

  make_vae(tmp_path / "ok")
  fname = "diffusion_pytorch_model.safetensors"
  state = load_file(str(tmp_path / "ok" / fname))
  bad = _write(tmp_path / "bad")
  save_file({k: v for k, v in state.items() if k != "decoder.conv_out.bias"}, f"{bad}/{fname}")
  with pytest.raises(ValueError, match="^vae: missing tensor decoder.conv_out.bias in"):
    autoencoder_from_diffusers(bad)
  save_file({**state, "decoder.conv_out.bias": np.zeros(4, np.float32)}, f"{bad}/{fname}")
  with pytest.raises(ValueError, match=r"^vae: tensor decoder.conv_out.bias has shape \(4,\)"):
    autoencoder_from_diffusers(bad)
  save_file({**state, "extra.weight": np.zeros(1, np.float32)}, f"{bad}/{fname}")
  with pytest.raises(ValueError, match="^vae: 1 unexpected tensors .* e.g. extra.weight$"):
    autoencoder_from_diffusers(bad)
  # pre-0.14 attention names (query/key/value/proj_attn) load to the same parameters
  legacy = {}
  for k, v in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      k = k.replace(f".{new}.", f".{old}.")
    legacy[k] = v
  assert any(".proj_attn." in k for k in legacy)
  save_file(legacy, f"{bad}/{fname}")
  a = nnx.state(autoencoder_from_diffusers(str(tmp_path / "ok")), nnx.Param)
  b = nnx.state(autoencoder_from_diffusers(bad), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, a, b)
