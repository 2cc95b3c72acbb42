"""End to end: ddx.latent.generate vs the Stable Diffusion loop run with diffusers' schedulers and
torch models (tiny random U-Net and VAE, injected latents and text embeddings, CFG included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ddx
from ddx import latent
from ddx.models import AutoencoderKL, autoencoder_from_diffusers, from_diffusers
from tests._latent_refs import abstract_tiny, refs

UNET = dict(
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
)
VAE = dict(
  in_channels=3,
  out_channels=3,
  block_out_channels=(8, 16),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=4,
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
)
SD_SCHED = dict(
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  steps_offset=1,
  set_alpha_to_one=False,
  num_train_timesteps=1000,
)
STEPS, GUIDANCE = 8, 7.5


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def perturb(torch, model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def build_components(path):
  """Tiny random torch U-Net / VAE saved under ``path`` and imported, plus inputs."""
  torch, diffusers, _ = refs()
  torch.manual_seed(0)
  tunet = perturb(torch, diffusers.UNet2DConditionModel(**UNET))
  tvae = perturb(torch, diffusers.AutoencoderKL(**VAE))
  tunet.save_pretrained(str(path / "unet"), safe_serialization=True)
  tvae.save_pretrained(str(path / "vae"), safe_serialization=True)
  rng = np.random.RandomState(0)
  x_T = rng.randn(2, 4, 8, 8).astype(np.float32)
  cond = rng.randn(2, 7, 12).astype(np.float32)
  uncond = np.repeat(rng.randn(1, 7, 12).astype(np.float32), 2, axis=0)
  return dict(
    tunet=tunet,
    tvae=tvae,
    unet=from_diffusers(str(path)),
    vae=autoencoder_from_diffusers(str(path)),
    x_T=x_T,
    cond=cond,
    uncond=uncond,
  )


@pytest.fixture(scope="module")
def components(tmp_path_factory):
  return build_components(tmp_path_factory.mktemp("sd_tiny"))


def diffusers_loop(c, scheduler):
  """The StableDiffusionPipeline denoising loop, on given latents and embeddings."""
  import torch

  scheduler.set_timesteps(STEPS)
  latents = torch.from_numpy(c["x_T"]) * scheduler.init_noise_sigma
  emb = torch.from_numpy(np.concatenate([c["uncond"], c["cond"]]))
  with torch.inference_mode():
    for t in scheduler.timesteps:
      inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
      noise = c["tunet"](inp, t, encoder_hidden_states=emb).sample
      u, g = noise.chunk(2)
      latents = scheduler.step(u + GUIDANCE * (g - u), t, latents).prev_sample
    image = c["tvae"].decode(latents / c["tvae"].config.scaling_factor).sample
  return image.numpy(), latents.numpy()


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", ["ddim", "plms", "euler", "heun"])
def test_generate_matches_diffusers_pipeline_loop(components, name):
  _, diffusers, _ = refs()
  c = components
  if name == "ddim":
    ref_sched = diffusers.DDIMScheduler(**SD_SCHED, clip_sample=False)
  elif name == "plms":
    ref_sched = diffusers.PNDMScheduler(**SD_SCHED, skip_prk_steps=True)
  else:  # SD's leading spacing: diffusers' init_noise_sigma is sqrt(σ_0² + 1), as ddx's
    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}[name]
    kw = {k: v for k, v in SD_SCHED.items() if k not in ("set_alpha_to_one", "skip_prk_steps")}
    ref_sched = cls(**kw, timestep_spacing="leading")
  ref_img, ref_lat = diffusers_loop(c, ref_sched)
  sampler = latent.sd_sampler(name, STEPS)
  np.testing.assert_array_equal(np.asarray(sampler.timesteps)[-STEPS:], ref_sched.timesteps.numpy()[-STEPS:])
  img, lat = latent.generate(
    c["unet"],
    c["vae"],
    c["cond"],
    c["uncond"],
    sampler,
    c["x_T"].transpose(0, 2, 3, 1),
    guidance_scale=GUIDANCE,
    return_latents=True,
  )
  assert img.shape == (2, 16, 16, 3)
  # float32 both sides; measured 6e-7 .. 9e-7 (benchmarks/latent_conformance.py)
  assert rel_err(np.asarray(lat).transpose(0, 3, 1, 2), ref_lat) < 1e-5
  assert rel_err(np.asarray(img).transpose(0, 3, 1, 2), ref_img) < 1e-5


def test_context_guidance_wrappers():
  """CFG over contexts: one call on [uncond; cond] (that order), u + w (c - u); and the
  unguided wrapper passes the context through. A model whose output depends on all three
  inputs makes a swapped half or a wrong formula visible."""

  def model(x, t, ctx):
    return x * ctx.sum(axis=(1, 2))[:, None, None, None] + t[:, None, None, None]

  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  t = jnp.array([5, 7])
  cond = jax.random.normal(jax.random.key(1), (2, 3, 6))
  uncond = jax.random.normal(jax.random.key(2), (2, 3, 6))
  u, c = model(x, t, uncond), model(x, t, cond)

  @jax.jit
  def both(x, t, cond, uncond):
    return (
      ddx.guidance.classifier_free_context(model, cond, uncond, 7.5)(x, t),
      ddx.guidance.text_conditional(model, cond)(x, t),
    )

  got, plain = both(x, t, cond, uncond)
  np.testing.assert_allclose(got, u + 7.5 * (c - u), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain, c, rtol=1e-6, atol=1e-6)


def test_bad_inputs():
  unet, vae = abstract_tiny()
  s = latent.sd_sampler("ddim", 2)
  ctx, x = jnp.zeros((2, 7, 12)), jnp.zeros((2, 8, 8, 4))
  cases = [
    (dict(x_T=jnp.zeros((2, 8, 8, 3))), r"^x_T: expected latents \[B, h, w, 4\]"),
    (dict(x_T=jnp.zeros((2, 8, 8))), r"^x_T: expected latents"),
    (dict(x_T=jnp.zeros((2, 7, 8, 4))), r"^x_T: latent height and width must be divisible by 2"),
    (dict(context=jnp.zeros((2, 7, 16))), r"^context: expected text embeddings \[B, L, 12\]"),
    (dict(uncond_context=jnp.zeros((2, 7, 8))), r"^uncond_context: expected text embeddings"),
    (dict(uncond_context=jnp.zeros((2, 5, 12))), r"^uncond_context: length 5 differs"),
    (dict(context=jnp.zeros((3, 7, 12))), r"^context: batch 3 differs from x_T's batch 2$"),
  ]
  for change, msg in cases:
    args = {**dict(unet=unet, vae=vae, context=ctx, uncond_context=ctx, sampler=s, x_T=x), **change}
    with pytest.raises(ValueError, match=msg) as e:
      latent.generate(**args)
    assert "\n" not in str(e.value)
  vae8 = nnx.eval_shape(
    lambda: AutoencoderKL(block_out_channels=(8,), latent_channels=8, norm_num_groups=4, rngs=nnx.Rngs(0))
  )
  with pytest.raises(ValueError, match="^vae: its latent_channels 8 differ"):
    latent.generate(unet, vae8, ctx, ctx, s, x)


def test_sd_sampler_settings():
  s = latent.sd_sampler("plms", 50)
  sched = ddx.schedules.make("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
  ref = ddx.samplers.make("plms", sched, 50, steps_offset=1, set_alpha_to_one=False)
  jax.tree.map(np.testing.assert_array_equal, s, ref)
  assert int(s.timesteps[0]) == 981 and int(s.timesteps[-1]) == 1
