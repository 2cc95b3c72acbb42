"""ddx.latent.pipeline and ``python -m ddx txt2img`` on a tiny random Stable Diffusion pipeline folder,
against diffusers' StableDiffusionPipeline on the same folder (tokenizer, text encoder, CFG with
the empty negative prompt, PNDM/PLMS loop, VAE decode)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from ddx.cli import main as cli
from ddx.latent import pipeline
from tests._latent_refs import PROMPTS, STEPS


@pytest.mark.torch
def test_a_pipeline_folder_on_a_bucket_loads_like_the_local_one(sd_folder, gcs):
  import fsspec  # noqa: PLC0415

  path, _ = sd_folder
  remote = gcs.root("pipelines/tiny-sd")
  fs, key = fsspec.core.url_to_fs(remote)
  for root, _, names in os.walk(path):
    for n in names:
      fs.pipe_file(f"{key}/{os.path.relpath(os.path.join(root, n), path)}", open(os.path.join(root, n), "rb").read())
  a, b = pipeline.load(path), pipeline.load(remote)
  assert b.path == remote and a.scheduler == b.scheduler and a.diffusion == b.diffusion
  for name in ("unet", "vae", "text_encoder"):
    la, lb = (jax.tree_util.tree_leaves(nnx.state(getattr(p, name), nnx.Param)) for p in (a, b))
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert a.tokenizer(PROMPTS).input_ids == b.tokenizer(PROMPTS).input_ids
  with pytest.raises(FileNotFoundError, match=r"^pipeline: folder not found: gs://ddx-test/pipelines/none$"):
    pipeline.load(gcs.root("pipelines/none"))


@pytest.mark.slow
@pytest.mark.torch
def test_txt2img_matches_diffusers_pipeline(sd_folder, tmp_path):
  import torch

  path, tpipe = sd_folder
  pipe = pipeline.load(path)
  key = jax.random.key(3)
  x_T = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (2, 8, 8, 4)))
  ref = tpipe(
    PROMPTS,
    num_inference_steps=STEPS,
    guidance_scale=7.5,
    latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()),
    output_type="np",
  ).images
  ours = np.asarray(pipe.txt2img(PROMPTS, sampler="plms", steps=STEPS, guidance=7.5, key=key))
  ours01 = np.clip(ours / 2 + 0.5, 0, 1)
  assert ours01.shape == ref.shape == (2, 16, 16, 3)
  assert np.abs(ours01 - ref).max() < 1e-5
  # CFG rescale: diffusers' guidance_rescale
  ref = tpipe(
    PROMPTS,
    num_inference_steps=STEPS,
    guidance_scale=7.5,
    guidance_rescale=0.7,
    latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()),
    output_type="np",
  ).images
  rescaled = np.asarray(pipe.txt2img(PROMPTS, sampler="plms", steps=STEPS, guidance=7.5, key=key, guidance_rescale=0.7))
  assert np.abs(np.clip(rescaled / 2 + 0.5, 0, 1) - ref).max() < 1e-5 and np.abs(rescaled - ours).max() > 1e-3

  # the command writes the same images (its initial latents come from --seed the same way)
  code = cli.main(
    [
      "ddx",
      "txt2img",
      f"--pipeline={path}",
      f"--prompt={PROMPTS[0]}",
      f"--prompt={PROMPTS[1]}",
      "--sampler=plms",
      f"--steps={STEPS}",
      "--guidance=7.5",
      "--seed=3",
      f"--out={tmp_path}/t2i",
    ]
  )
  assert code == 0 and os.path.isfile(f"{tmp_path}/t2i.png")
  with np.load(f"{tmp_path}/t2i.npz") as z:
    np.testing.assert_allclose(z["samples"], ours, atol=1e-5)
    assert list(z["prompts"]) == PROMPTS


@pytest.mark.torch
def test_prompt_too_long(sd_folder):
  pipe = pipeline.load(sd_folder[0])
  assert pipe.tokenize(["a cat"]).shape == (1, 16)
  # unmerged words are one token per character: 1 + 3 + 1 + 5 + 1 + 3 + 3 + start/end = 19
  with pytest.raises(
    ValueError,
    match=r"^prompt: 19 tokens \(with start/end\) exceed the text "
    r"encoder's context of 16",
  ):
    pipe.tokenize(["a red cat photo of dog dog"])


def _copy(folder, tmp_path, edit):
  dst = str(tmp_path / "p")
  shutil.copytree(folder, dst)
  index = os.path.join(dst, "model_index.json")
  with open(index) as f:
    cfg = json.load(f)
  edit(cfg, dst)
  with open(index, "w") as f:
    json.dump(cfg, f)
  return dst


@pytest.mark.torch
@pytest.mark.parametrize(
  "edit,err,msg",
  [
    (lambda c, d: c.pop("vae"), ValueError, "^vae: missing from .*model_index.json$"),
    (
      lambda c, d: c.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
      ValueError,
      "^text_encoder_2: unsupported pipeline component",
    ),
    (lambda c, d: c.update(unet=["diffusers", "UNet2DModel"]), ValueError, "^unet: unsupported component class"),
    (
      lambda c, d: shutil.rmtree(os.path.join(d, "text_encoder")),
      FileNotFoundError,
      "^text_encoder: missing component folder",
    ),
    (
      lambda c, d: os.remove(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")),
      FileNotFoundError,
      "^unet: missing weights file",
    ),
  ],
)
def test_bad_pipeline_folder(sd_folder, tmp_path, edit, err, msg):
  with pytest.raises(err, match=msg) as e:
    pipeline.load(_copy(sd_folder[0], tmp_path, edit))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "argv,msg",
  [
    (["--prompt=x"], "--pipeline: required"),
    (["--pipeline=/nonexistent", "--prompt=x", "--sampler=k_euler"], "--sampler: must be one of"),
    (["--pipeline=/nonexistent", "--prompt=x", "--steps=0"], "--steps: must be >= 1"),
    (["--pipeline=/nonexistent", "--prompt=x", "--sigmas=karras"], r"--sigmas: only the samplers \('dpm_solver\+\+',"),
    (["--pipeline=/nonexistent", "--prompt=x", "--sampler=heun", "--sigmas=rho"], "--sigmas: must be one of"),
    (["--pipeline=/nonexistent", "--prompt=x"], "pipeline: folder not found: /nonexistent"),
  ],
)
def test_command_errors(argv, msg):
  with pytest.raises((ValueError, FileNotFoundError), match=f"^{msg}"):
    cli.main(["ddx", "txt2img", *argv])
