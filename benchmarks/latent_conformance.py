"""Largest relative errors of the latent stack vs the PyTorch references (seeded tiny models).

    python benchmarks/latent_conformance.py

The same constructions as tests/oracle/test_autoencoder.py, test_unet_cond.py, test_clip_text.py and
test_latent.py and test_latent_edit.py (which assert the bounds); this prints the measured values. Needs torch,
diffusers and transformers.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import _torchvision_compat  # noqa: E402

_torchvision_compat.install()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from ddx import latent  # noqa: E402
from ddx.models import autoencoder_from_diffusers, clip_text_from_transformers, from_diffusers  # noqa: E402
from tests.oracle import test_autoencoder as ta  # noqa: E402
from tests.oracle import test_clip_text as tc  # noqa: E402
from tests.oracle import test_latent as tl  # noqa: E402
from tests.oracle import test_latent_edit as te  # noqa: E402
from tests.oracle import test_unet_cond as tu  # noqa: E402


def main():
  torch.set_num_threads(1)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    tm = ta.make_vae(f"{d}/vae")
    vae = autoencoder_from_diffusers(f"{d}/vae")
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
      dist = tm.encode(torch.from_numpy(x)).latent_dist
      z = dist.mean
      dec = tm.decode(z).sample.numpy()
    g, s = nnx.split(vae)
    mean, logvar = ta._encode(g, s, ta.nhwc(x))
    rows += [
      ("vae encode mean", ta.rel_err(ta.nchw(mean), dist.mean.numpy())),
      ("vae encode logvar", ta.rel_err(ta.nchw(logvar), dist.logvar.numpy())),
      ("vae decode", ta.rel_err(ta.nchw(ta._decode(g, s, ta.nhwc(z.numpy()), False)), dec)),
    ]

    for name, cfg in (("sd1_like", tu.SD1_LIKE), ("sd2_like", tu.SD2_LIKE)):
      tmu = tu.make_unet(f"{d}/u_{name}/unet", cfg)
      m = from_diffusers(f"{d}/u_{name}")
      rng = np.random.RandomState(1)
      xx = rng.randn(2, 4, 8, 8).astype(np.float32)
      t = np.array([3, 981])
      ctx = rng.randn(2, 7, cfg["cross_attention_dim"]).astype(np.float32)
      y = np.array([1.5, 700.0], np.float32) if cfg.get("class_embed_type") else np.array([0, 4])
      with torch.inference_mode():
        ref = tmu(
          torch.from_numpy(xx), torch.from_numpy(t), torch.from_numpy(ctx), class_labels=torch.from_numpy(y)
        ).sample.numpy()
      out = tu.apply(
        m, jnp.asarray(xx.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32), jnp.asarray(ctx), jnp.asarray(y)
      )
      rows.append((f"unet {name}", tu.rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref)))

    for act, eos in (("quick_gelu", 2), ("gelu", 30)):
      tmc = tc.make_clip(f"{d}/c_{act}", hidden_act=act, eos_token_id=eos)
      c = clip_text_from_transformers(f"{d}/c_{act}")
      with torch.inference_mode():
        o = tmc(torch.from_numpy(tc.IDS))
      h, pooled = tc._apply(*nnx.split(c), jnp.asarray(tc.IDS, jnp.int32))
      rows += [
        (f"clip {act} hidden", tc.rel_err(h, o.last_hidden_state.numpy())),
        (f"clip {act} pooled", tc.rel_err(pooled, o.pooler_output.numpy())),
      ]

    comps = tl.build_components(pathlib.Path(d))
    _, diffusers, _ = tl.refs()
    for name in ("ddim", "plms"):
      sched = (
        diffusers.DDIMScheduler(**tl.SD_SCHED, clip_sample=False)
        if name == "ddim"
        else diffusers.PNDMScheduler(**tl.SD_SCHED, skip_prk_steps=True)
      )
      ref_img, ref_lat = tl.diffusers_loop(comps, sched)
      img, lat = latent.generate(
        comps["unet"],
        comps["vae"],
        comps["cond"],
        comps["uncond"],
        latent.sd_sampler(name, tl.STEPS),
        comps["x_T"].transpose(0, 2, 3, 1),
        guidance_scale=tl.GUIDANCE,
        return_latents=True,
      )
      rows += [
        (
          f"generate {name} {tl.STEPS} steps, w={tl.GUIDANCE}: latents",
          tl.rel_err(np.asarray(lat).transpose(0, 3, 1, 2), ref_lat),
        ),
        (
          f"generate {name} {tl.STEPS} steps, w={tl.GUIDANCE}: images",
          tl.rel_err(np.asarray(img).transpose(0, 3, 1, 2), ref_img),
        ),
      ]
    comps["image"] = te.init_image()
    for name in ("ddim", "ddpm"):
      for what, err in te.measure_img2img(comps, name).items():
        rows.append((f"img2img {name}, strength {te.STRENGTH} ({tl.STEPS} steps), w={tl.GUIDANCE}: {what}", err))
    for what, err in te.measure_inpaint(comps).items():
      rows.append((f"inpaint ddim {tl.STEPS} steps, w={tl.GUIDANCE}: {what}", err))
  print("| comparison | max relative error |\n|---|---|")
  for name, err in rows:
    print(f"| {name} | {err:.2e} |")


if __name__ == "__main__":
  main()
