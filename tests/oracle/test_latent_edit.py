"""img2img and inpainting in latent space (ddx.latent.img2img / inpaint, the txt2img command's
--init_image / --mask) against torch loops with diffusers' schedulers and the torch models, and
against diffusers' StableDiffusionImg2ImgPipeline (tiny random components, the noise ddx draws
injected on the torch side, guidance 7.5)."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddx import latent
from ddx.cli import main as cli
from tests._latent_refs import PROMPTS, abstract_tiny, refs
from tests.oracle.test_latent import GUIDANCE, SD_SCHED, STEPS, build_components, rel_err

STRENGTH = 0.6  # int(8 * 0.6) = 4 of the 8 grid points run


def init_image():
  """A smooth image pair in [-1, 1], [2, 16, 16, 3] (the VAE factor is 2: latents 8 x 8)."""
  yy, xx = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
  img = np.stack([np.sin(2 * xx + yy), np.cos(3 * yy), xx * yy], -1).astype(np.float32)
  return np.stack([img, img[::-1]])


@pytest.fixture(scope="module")
def components(tmp_path_factory):
  """`tests.test_latent.build_components` plus an init image."""
  c = build_components(tmp_path_factory.mktemp("sd_tiny_edit"))
  c["image"] = init_image()
  return c


def _nchw(a):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def _normal(key, j, shape):
  return np.asarray(jax.random.normal(jax.random.fold_in(key, j), shape, jnp.float32))


def _guided(c, scheduler, latents, t, emb):
  inp = scheduler.scale_model_input(latents.repeat(2, 1, 1, 1), t)
  u, g = c["tunet"](inp, t, encoder_hidden_states=emb).sample.chunk(2)
  return u + GUIDANCE * (g - u)


def _encode(c, key):
  """diffusers' ``retrieve_latents(vae.encode(x), sample_mode="sample")`` with ddx's posterior
  draw injected: mean + std * eps, then x scaling_factor."""
  post = c["tvae"].encode(_nchw(c["image"])).latent_dist
  eps = _nchw(_normal(key, latent.ENCODE_KEY, (2, 8, 8, 4)))
  return c["tvae"].config.scaling_factor * (post.mean + post.std * eps), post


def measure_img2img(c, name):
  """Relative errors of `latent.img2img` vs what StableDiffusionImg2ImgPipeline does after
  preprocessing: timesteps from strength (its get_timesteps), scheduler.add_noise at the
  first of them, the guided loop, decode. Also used by benchmarks/latent_conformance.py."""
  import torch

  _, diffusers, _ = refs()
  from tests import _oracle_models as om

  key = jax.random.key(11)
  sd = {k: v for k, v in SD_SCHED.items() if k != "set_alpha_to_one" or name == "ddim"}
  sch = (
    diffusers.DDIMScheduler(**sd, clip_sample=False)
    if name == "ddim"
    else diffusers.DDPMScheduler(**sd, clip_sample=False)
  )
  sch.set_timesteps(STEPS)
  timesteps, n = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
    types.SimpleNamespace(scheduler=sch), STEPS, STRENGTH, "cpu"
  )
  assert n == 4
  emb = torch.from_numpy(np.concatenate([c["uncond"], c["cond"]]))
  shape = (2, 8, 8, 4)
  with torch.inference_mode(), om.patched_ddpm_noise() as box:
    z0, post = _encode(c, key)
    x = sch.add_noise(z0, _nchw(_normal(key, 0, shape)), timesteps[:1])
    for e, t in enumerate(timesteps):
      # the driver's noise for entry e of a run started mid-grid: fold_in(fold_in(key, 1), e)
      box[0] = _nchw(_normal(jax.random.fold_in(key, 1), e, shape))
      x = sch.step(_guided(c, sch, x, t, emb), t, x).prev_sample
    ref_img = c["tvae"].decode(x / c["tvae"].config.scaling_factor).sample.numpy()
    ref_lat = x.numpy()
    mean = (c["tvae"].config.scaling_factor * post.mean).numpy()

  img, lat = latent.img2img(
    c["unet"],
    c["vae"],
    c["cond"],
    c["uncond"],
    latent.sd_sampler(name, STEPS),
    c["image"],
    STRENGTH,
    key,
    guidance_scale=GUIDANCE,
    return_latents=True,
  )
  assert img.shape == (2, 16, 16, 3)
  out = dict(
    latents=rel_err(np.asarray(lat).transpose(0, 3, 1, 2), ref_lat),
    images=rel_err(np.asarray(img).transpose(0, 3, 1, 2), ref_img),
  )
  if name == "ddim":  # posterior="mean": the scaled posterior mean
    out["posterior mean"] = rel_err(np.asarray(latent.encode(c["vae"], c["image"])).transpose(0, 3, 1, 2), mean)
  return out


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_img2img_matches_diffusers_loop(components, name):
  errs = measure_img2img(components, name)
  assert max(errs.values()) < 1e-5, errs


def _pixel_mask():
  m = np.ones((16, 16), np.float32)
  m[3:11, 5:12] = 0  # odd edges: blocks partly to be filled become free latents
  return m


def measure_inpaint(c):
  """Relative errors of `latent.inpaint` (paste=True) vs an independent torch loop of the
  replacement rule on latents: x_T = noise with the kept latents at the first level; after each
  DDIM step the kept latents are z0 noised to the level of the next timestep (the final alpha
  after the last step). The latent mask is 1 - maxpool(1 - mask): kept only where the whole
  2 x 2 pixel block is kept."""
  import torch

  _, diffusers, _ = refs()
  key = jax.random.key(12)
  sch = diffusers.DDIMScheduler(**SD_SCHED, clip_sample=False)
  sch.set_timesteps(STEPS)
  ts = sch.timesteps
  mask = _pixel_mask()
  lm = 1 - torch.nn.functional.max_pool2d(torch.from_numpy(1 - mask)[None, None], 2)
  assert 0 < float(lm.mean()) < 1
  emb = torch.from_numpy(np.concatenate([c["uncond"], c["cond"]]))
  shape = (2, 8, 8, 4)
  with torch.inference_mode():
    z0, _ = _encode(c, key)
    x = lm * sch.add_noise(z0, _nchw(_normal(key, 3, shape)), ts[:1]) + (1 - lm) * _nchw(_normal(key, 0, shape))
    for e, t in enumerate(ts):
      x = sch.step(_guided(c, sch, x, t, emb), t, x).prev_sample
      a = sch.alphas_cumprod[ts[e + 1]] if e + 1 < len(ts) else sch.final_alpha_cumprod
      known = a.sqrt() * z0 + (1 - a).sqrt() * _nchw(_normal(jax.random.fold_in(key, 2), e, shape))
      x = lm * known + (1 - lm) * x
    ref_img = c["tvae"].decode(x / c["tvae"].config.scaling_factor).sample.numpy().transpose(0, 2, 3, 1)
    ref_lat = x.numpy()

  img, lat = latent.inpaint(
    c["unet"],
    c["vae"],
    c["cond"],
    c["uncond"],
    latent.sd_sampler("ddim", STEPS),
    c["image"],
    mask,
    key,
    guidance_scale=GUIDANCE,
    paste=True,
    return_latents=True,
  )
  img = np.asarray(img)
  keep = mask[None, :, :, None].astype(bool) & np.ones_like(img, bool)
  # paste=True: the input pixels where the mask keeps them, the decoded latents elsewhere
  np.testing.assert_array_equal(img[keep], c["image"][keep])
  np.testing.assert_array_equal(latent.latent_mask(mask, (2, 16, 16), 2), lm[0, 0].numpy())
  return dict(
    latents=rel_err(np.asarray(lat).transpose(0, 3, 1, 2), ref_lat),
    images=float(np.abs(img[~keep] - ref_img[~keep]).max() / np.abs(ref_img).max()),
  )


@pytest.mark.torch
def test_inpaint_matches_torch_replacement_loop(components):
  errs = measure_inpaint(components)
  assert max(errs.values()) < 1e-5, errs


def test_bad_inputs():
  unet, vae = abstract_tiny()
  ddim = latent.sd_sampler("ddim", 4)
  ctx, img, key = jnp.zeros((2, 7, 12)), jnp.zeros((2, 16, 16, 3)), jax.random.key(0)
  base = dict(unet=unet, vae=vae, context=ctx, uncond_context=ctx, sampler=ddim, image=img, key=key)
  cases = [
    (
      dict(image=jnp.zeros((2, 18, 16, 3))),
      r"^image: height and width must be divisible by 4 \(the VAE's "
      r"factor 2 x the U-Net's 2\), got \(18, 16\)$",
    ),
    (dict(image=jnp.zeros((2, 16, 16, 1))), r"^image: expected images \[B, H, W, 3\]"),
    (dict(image=jnp.zeros((2, 16, 16))), r"^image: expected images \[B, H, W, 3\]"),
    (dict(image=jnp.zeros((2, 16, 16, 3), jnp.uint8)), r"^image: expected a floating dtype"),
    (dict(image=jnp.zeros((3, 16, 16, 3))), r"^image: batch 3 differs from the context's batch 2$"),
    (dict(sampler=latent.sd_sampler("plms", 4)), r"^sampler: .* needs a single-step sampler .*, got PLMS"),
    (dict(key=None), r"^key: img2img and inpainting need a PRNG key"),
    (dict(vae=None), r"^vae: img2img and inpainting need the autoencoder"),
    (dict(context=jnp.zeros((2, 7, 16))), r"^context: expected text embeddings \[B, L, 12\]"),
  ]
  for change, msg in cases:
    for fn, extra in ((latent.img2img, dict(strength=0.5)), (latent.inpaint, dict(mask=np.ones((16, 16))))):
      with pytest.raises(ValueError, match=msg) as e:
        fn(**{**base, **change, **extra})
      assert "\n" not in str(e.value)
  for s in (0.0, -0.5, 1.5, float("nan"), float("inf"), True):
    with pytest.raises(ValueError, match=r"^strength: must be in \(0, 1\], got ") as e:
      latent.img2img(**base, strength=s)
    assert "\n" not in str(e.value)
  for m, msg in (
    (np.ones((8, 8)), r"^mask: expected shape \(16, 16\) or \(2, 16, 16\) \(the image's"),
    (np.ones((2, 16, 16, 3)), r"^mask: expected shape"),
    (np.full((16, 16), 0.5), r"^mask: must be binary \(1 = keep, 0 = fill\)"),
  ):
    with pytest.raises(ValueError, match=msg) as e:
      latent.inpaint(**base, mask=m)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"^posterior: must be one of \('sample', 'mean'\), got 'mode'$"):
    latent.img2img(**base, strength=0.5, posterior="mode")


def _write_png(path, a):
  Image.fromarray(np.asarray(a)).save(path)
  return str(path)


@pytest.mark.slow
@pytest.mark.torch
def test_command_img2img_matches_diffusers_pipeline(sd_folder, tmp_path, monkeypatch):
  """``txt2img --init_image`` vs diffusers' StableDiffusionImg2ImgPipeline on the same folder
  (DDIM, strength 0.5 of 6 steps), both randn draws (the VAE posterior's and add_noise's)
  replaced by ddx's; then ``--mask --paste`` writes the input pixels where the mask is white."""
  _, diffusers, _ = refs()
  from diffusers.models.autoencoders import vae as vae_mod
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as i2i_mod

  path, tpipe = sd_folder
  rng = np.random.RandomState(1)
  u8 = np.clip(np.cumsum(rng.randint(0, 40, (16, 16, 3)), 0), 0, 255).astype(np.uint8)
  png = _write_png(tmp_path / "in.png", u8)
  key, steps, strength = jax.random.key(5), 6, 0.5
  draws = {"post": _nchw(_normal(key, latent.ENCODE_KEY, (2, 8, 8, 4))), "noise": _nchw(_normal(key, 0, (2, 8, 8, 4)))}

  def fake(which):
    def randn(shape, generator=None, device=None, dtype=None, layout=None):
      z = draws.pop(which)
      assert tuple(z.shape) == tuple(shape)
      return z.to(dtype=dtype)

    return randn

  monkeypatch.setattr(vae_mod, "randn_tensor", fake("post"))
  monkeypatch.setattr(i2i_mod, "randn_tensor", fake("noise"))
  ddim = diffusers.DDIMScheduler.from_config(tpipe.scheduler.config, clip_sample=False)
  i2i = diffusers.StableDiffusionImg2ImgPipeline(**{**tpipe.components, "scheduler": ddim})
  ref = i2i(
    PROMPTS,
    image=np.stack([u8, u8]).astype(np.float32) / 255.0,
    strength=strength,
    num_inference_steps=steps,
    guidance_scale=7.5,
    output_type="np",
  ).images
  assert not draws

  code = cli.main(
    [
      "ddx",
      "txt2img",
      f"--pipeline={path}",
      f"--prompt={PROMPTS[0]}",
      f"--prompt={PROMPTS[1]}",
      f"--init_image={png}",
      f"--strength={strength}",
      f"--steps={steps}",
      "--seed=5",
      f"--out={tmp_path}/i2i",
    ]
  )
  assert code == 0 and os.path.isfile(f"{tmp_path}/i2i.png")
  with np.load(f"{tmp_path}/i2i.npz") as z:
    ours01 = np.clip(z["samples"] / 2 + 0.5, 0, 1)
    assert z["strength"] == np.float32(strength) and z["init_image"].shape == (16, 16, 3)
  assert ours01.shape == ref.shape == (2, 16, 16, 3)
  assert np.abs(ours01 - ref).max() < 1e-5

  mask = np.full((16, 16), 255, np.uint8)
  mask[4:12, 2:9] = 0
  mpng = _write_png(tmp_path / "mask.png", mask)
  # the same prompts and steps: the text encoder, VAE and U-Net programs are reused
  code = cli.main(
    [
      "ddx",
      "txt2img",
      f"--pipeline={path}",
      f"--prompt={PROMPTS[0]}",
      f"--prompt={PROMPTS[1]}",
      f"--init_image={png}",
      f"--mask={mpng}",
      "--paste",
      f"--steps={steps}",
      f"--out={tmp_path}/inp",
    ]
  )
  assert code == 0
  with np.load(f"{tmp_path}/inp.npz") as z:
    out, x0 = z["samples"], z["init_image"]
    assert np.isfinite(out).all() and out.shape == (2, 16, 16, 3)
    keep = np.broadcast_to((mask == 255)[None], out.shape[:3])
    np.testing.assert_array_equal(out[keep], np.broadcast_to(x0, out.shape)[keep])
    assert np.abs(out[~keep] - np.broadcast_to(x0, out.shape)[~keep]).max() > 1e-3  # the hole was generated


@pytest.mark.parametrize(
  "argv,msg",
  [
    (["--strength=0.5"], "--strength: needs --init_image"),
    (["--mask=m.png"], "--mask: needs --init_image"),
    (["--paste"], "--paste: needs --init_image and --mask"),
    (["--init_image=/nonexistent.png"], "--init_image: no such file '/nonexistent.png'"),
    (["--init_image={png}", "--sampler=plms"], "--sampler: editing an --init_image needs ddim or ddpm"),
    (["--init_image={png}", "--height=16"], "--height: not used with --init_image"),
    (["--init_image={png}", "--mask={png}", "--strength=0.5"], "--strength: not used with --mask"),
    (["--init_image={png}", "--paste"], "--paste: needs --mask"),
    (["--init_image={png}", "--eta=0.5"], "pipeline: folder not found"),  # ddim is the default: eta is fine
  ],
)
def test_command_edit_errors(tmp_path, argv, msg):
  png = _write_png(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
  argv = [a.format(png=png) for a in argv]
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    cli.main(["ddx", "txt2img", "--pipeline=/nonexistent", "--prompt=x", *argv])
  assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


@pytest.mark.torch
def test_command_bad_init_image(sd_folder, tmp_path):
  path = sd_folder[0]
  for shape, msg in [((18, 16, 3), "must be divisible by 4"), ((16, 16), "has mode L")]:
    png = _write_png(tmp_path / "b.png", np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=f"^--init_image: .*{msg}") as e:
      cli.main(["ddx", "txt2img", f"--pipeline={path}", "--prompt=a cat", f"--init_image={png}", f"--out={tmp_path}/x"])
    assert "\n" not in str(e.value)
  assert not os.path.exists(f"{tmp_path}/x.npz")
  with pytest.raises(ValueError, match=r"^--mask: .* is 8x8, the model takes 16x16"):
    cli.main(
      [
        "ddx",
        "txt2img",
        f"--pipeline={path}",
        "--prompt=a cat",
        f"--init_image={_write_png(tmp_path / 'c.png', np.zeros((16, 16, 3), np.uint8))}",
        f"--mask={_write_png(tmp_path / 'm.png', np.zeros((8, 8), np.uint8))}",
      ]
    )
