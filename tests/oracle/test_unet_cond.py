"""ddx.models.UNetCond vs diffusers' UNet2DConditionModel (seeded random tiny models), import errors."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddx.models import UNetCond, UNetCondConfig, from_diffusers, unet_cond_from_diffusers
from tests._latent_refs import refs, save_perturbed
from tests._tiny import numpy_init

# SD 1.x layout (1x1-conv projections, one head count for all levels) with a timestep-type
# class embedding; SD 2.x layout (linear projections, per-level head counts) with a class table
# and two transformer layers at level 1.
SD1_LIKE = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  block_out_channels=(16, 32),
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  attention_head_dim=2,
  cross_attention_dim=12,
  norm_num_groups=4,
  use_linear_projection=False,
  class_embed_type="timestep",
)
SD2_LIKE = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  block_out_channels=(16, 32),
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  attention_head_dim=[2, 4],
  transformer_layers_per_block=[1, 2],
  cross_attention_dim=24,
  norm_num_groups=4,
  use_linear_projection=True,
  upcast_attention=True,
  num_class_embeds=5,
)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def make_unet(path, config, seed=0):
  torch, diffusers, _ = refs()
  torch.manual_seed(seed)
  return save_perturbed(diffusers.UNet2DConditionModel(**config), path)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, t, context, y):
  return nnx.merge(graphdef, state)(x, t, context, y)


def apply(model, x, t, context, y=None):
  return _apply(*nnx.split(model), x, t, context, y)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("config", [SD1_LIKE, SD2_LIKE], ids=["sd1_like", "sd2_like"])
def test_matches_diffusers(tmp_path, config):
  import torch

  tmodel = make_unet(tmp_path / "unet", config)
  model = from_diffusers(str(tmp_path))  # the UNet2DModel entry point dispatches on _class_name
  assert isinstance(model, UNetCond)
  rng = np.random.RandomState(1)
  x = rng.randn(2, 4, 8, 8).astype(np.float32)
  t = np.array([3, 981])
  ctx = rng.randn(2, 7, config["cross_attention_dim"]).astype(np.float32)
  y = np.array([1.5, 700.0], np.float32) if config.get("class_embed_type") else np.array([0, 4])
  with torch.inference_mode():
    ref = tmodel(
      torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), class_labels=torch.from_numpy(y)
    ).sample.numpy()
  out = apply(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32), jnp.asarray(ctx), jnp.asarray(y))
  assert rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref) < 1e-5
  n_torch = sum(p.numel() for p in tmodel.parameters())
  assert n_torch == sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


SMALL = dict(
  block_out_channels=(16, 32),
  down_cross=(True, False),
  up_cross=(False, True),
  layers_per_block=1,
  num_heads=2,
  cross_attention_dim=8,
  norm_num_groups=4,
)


ONE_LEVEL = dict(
  block_out_channels=(16,),
  down_cross=(True,),
  up_cross=(True,),
  layers_per_block=1,
  num_heads=2,
  cross_attention_dim=8,
  norm_num_groups=4,
)


@pytest.mark.slow
def test_bfloat16_and_remat():
  f32 = numpy_init(lambda: UNetCond(**ONE_LEVEL, rngs=nnx.Rngs(0)))
  bf = numpy_init(lambda: UNetCond(**ONE_LEVEL, dtype="bfloat16", remat=True, rngs=nnx.Rngs(0)))
  key = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(key[0], (2, 4, 4, 4))
  ctx = jax.random.normal(key[1], (2, 5, 8))
  t = jnp.array([10, 500])
  a, b = apply(f32, x, t, ctx), apply(bf, x, t, ctx)
  assert b.dtype == jnp.float32 and 0 < rel_err(b, a) < 5e-2
  assert bf.down_blocks[0].attentions[0].proj_in.kernel.dtype == jnp.float32  # params stay f32

  # remat changes the backward pass only: the same gradients through a transformer block
  rm = numpy_init(lambda: UNetCond(**ONE_LEVEL, remat=True, rngs=nnx.Rngs(0)))
  h = jax.random.normal(key[0], (2, 4, 4, 16))

  @functools.partial(jax.jit, static_argnums=0)
  def grad(graphdef, state):
    def loss(s):
      m = nnx.merge(graphdef, s)
      return jnp.sum(m._block(m.mid_block.attentions[0], h, ctx) ** 2)

    return jax.grad(loss)(state)

  g1 = jax.tree.leaves(grad(*nnx.split(f32, nnx.Param)))
  g2 = jax.tree.leaves(grad(*nnx.split(rm, nnx.Param)))
  assert max(rel_err(u, v) for u, v in zip(g2, g1) if np.abs(v).max() > 0) < 1e-5


@pytest.mark.slow
def test_config_and_conv_impl():
  cfg = UNetCondConfig(**ONE_LEVEL)
  assert cfg.conv_impl == "auto" and cfg.layers_per_block == (1,) and cfg.to_json()["num_heads"] == [2]
  assert UNetCondConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
  # every convolution is ddx's Conv (3x3 in / out, resampling, residual blocks and the 1x1
  # projections): conv_impl chooses how they run, the parameters do not change
  key = jax.random.split(jax.random.key(1), 2)
  x, ctx, t = jax.random.normal(key[0], (2, 4, 4, 4)), jax.random.normal(key[1], (2, 5, 8)), jnp.array([10, 500])
  outs, shapes = {}, {}
  for impl in ("lax", "dots"):
    m = numpy_init(lambda impl=impl: UNetCond(cfg, conv_impl=impl, rngs=nnx.Rngs(0)))
    assert m.config.conv_impl == impl
    assert {m.conv_in.impl, m.conv_out.impl, m.mid_block.attentions[0].proj_in.impl} == {impl}
    assert m.mid_block.resnets[0].conv1.impl == impl
    outs[impl] = apply(m, x, t, ctx)
    shapes[impl] = jax.tree.map(lambda p: (p.shape, p.dtype), nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  assert shapes["dots"] == shapes["lax"]
  assert rel_err(outs["dots"], outs["lax"]) < 2e-5  # float32 summation order only
  with pytest.raises(ValueError, match=r"^conv_impl: must be one of \['auto', 'lax', 'dots'\], got 'fft'$"):
    UNetCondConfig(**ONE_LEVEL, conv_impl="fft")


def test_bad_inputs():
  m = nnx.eval_shape(lambda: UNetCond(**SMALL, rngs=nnx.Rngs(0)))
  x, t = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r"^context: expected \[B, L, 8\], got shape \(2, 5, 16\)$"):
    m(x, t, jnp.zeros((2, 5, 16)))
  with pytest.raises(ValueError, match=r"^x: expected latents \[B, H, W, 4\]"):
    m(jnp.zeros((2, 8, 8, 3)), t, jnp.zeros((2, 5, 8)))
  with pytest.raises(ValueError, match=r"^x: height and width must be divisible by 2"):
    m(jnp.zeros((2, 7, 8, 4)), t, jnp.zeros((2, 5, 8)))
  with pytest.raises(ValueError, match="^context: batch 1 differs from x's batch 2$"):
    m(x, t, jnp.zeros((1, 5, 8)))
  with pytest.raises(ValueError, match="^y: class labels given"):
    m(x, t, jnp.zeros((2, 5, 8)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"^num_heads: 3 heads do not divide 16 channels$"):
    UNetCond(**{**SMALL, "num_heads": 3}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^layers_per_block: needs one entry per level \(2\)"):
    UNetCond(**{**SMALL, "layers_per_block": [1, 1, 1]}, rngs=nnx.Rngs(0))


def _write(path, **changes):
  cfg = {"_class_name": "UNet2DConditionModel", **SD1_LIKE, **changes}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(path)


@pytest.mark.parametrize(
  "changes,key",
  [
    (dict(down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D")), "down_block_types"),
    (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
    (dict(addition_embed_type="text_time"), "addition_embed_type"),
    (dict(class_embed_type="projection"), "class_embed_type"),
    (dict(only_cross_attention=True), "only_cross_attention"),
    (dict(cross_attention_dim=[12, 12]), "cross_attention_dim"),
    (dict(time_cond_proj_dim=4), "time_cond_proj_dim"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(new_thing=1), "new_thing"),
  ],
)
def test_unsupported_config(tmp_path, changes, key):
  with pytest.raises(ValueError, match=f"^{key}: unsupported diffusers UNet2DConditionModel") as e:
    unet_cond_from_diffusers(_write(tmp_path, **changes))
  assert "\n" not in str(e.value)


@pytest.mark.torch
def test_bad_tensors(tmp_path):
  from safetensors.numpy import load_file, save_file

  make_unet(tmp_path / "ok", SD1_LIKE)
  fname = "diffusion_pytorch_model.safetensors"
  state = load_file(str(tmp_path / "ok" / fname))
  name = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
  assert name in state
  bad = _write(tmp_path / "bad")
  save_file({k: v for k, v in state.items() if k != name}, f"{bad}/{fname}")
  with pytest.raises(ValueError, match=f"^unet: missing tensor {name} in"):
    from_diffusers(bad)
  save_file({**state, name: state[name][:, :3]}, f"{bad}/{fname}")
  with pytest.raises(ValueError, match=rf"^unet: tensor {name} has shape \(128, 3\)"):
    from_diffusers(bad)
