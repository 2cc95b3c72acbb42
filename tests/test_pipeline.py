"""ddx.latent.pipeline and ``python -m ddx txt2img`` on a tiny random Stable Diffusion pipeline folder,
against diffusers' StableDiffusionPipeline on the same folder (tokenizer, text encoder, CFG with
the empty negative prompt, PNDM/PLMS loop, VAE decode)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from ddx.cli import main as cli
from ddx.latent import pipeline
from tests._latent_refs import refs

WORDS = ["a", "photo", "of", "cat", "dog", "red"]
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
  skip_prk_steps=True,
)
PROMPTS = ["a red cat", "photo of dog"]
STEPS = 5


def write_tokenizer(folder, max_length=16):
  """A CLIP BPE vocabulary of single characters (+ end-of-word forms) and a few merges."""
  os.makedirs(folder, exist_ok=True)
  vocab = {}
  for ch in sorted(set("".join(WORDS))):
    vocab[ch] = len(vocab)
    vocab[ch + "</w>"] = len(vocab)
  merges = ["o f</w>", "c a", "ca t</w>"]
  for m in ("of</w>", "ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"):
    vocab[m] = len(vocab)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}, f)
  return vocab


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  torch, diffusers, transformers = refs()
  path = tmp_path_factory.mktemp("sd_pipe")
  vocab = write_tokenizer(str(path / "tok_src"))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path / "tok_src"))
  torch.manual_seed(0)
  text = transformers.CLIPTextModel(
    transformers.CLIPTextConfig(
      vocab_size=len(vocab),
      hidden_size=12,
      intermediate_size=24,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=16,
      bos_token_id=vocab["<|startoftext|>"],
      eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"],
    )
  ).eval()
  unet = diffusers.UNet2DConditionModel(**UNET).eval()
  vae = diffusers.AutoencoderKL(**VAE).eval()
  with torch.no_grad():
    for m in (text, unet, vae):
      for name, p in m.named_parameters():
        if name.endswith("bias") or "norm" in name:
          p.add_(0.2 * torch.randn_like(p))
  pipe = diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text,
    tokenizer=tokenizer,
    unet=unet,
    scheduler=diffusers.PNDMScheduler(**SD_SCHED),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  out = str(path / "pipe")
  pipe.save_pretrained(out, safe_serialization=True)
  return out, pipe


@pytest.mark.torch
def test_txt2img_matches_diffusers_pipeline(folder, tmp_path):
  import torch

  path, tpipe = folder
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
def test_prompt_too_long(folder):
  pipe = pipeline.load(folder[0])
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
def test_bad_pipeline_folder(folder, tmp_path, edit, err, msg):
  with pytest.raises(err, match=msg) as e:
    pipeline.load(_copy(folder[0], tmp_path, edit))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "argv,msg",
  [
    (["--prompt=x"], "--pipeline: required"),
    (["--pipeline=/nonexistent", "--prompt=x", "--sampler=euler"], "--sampler: must be one of"),
    (["--pipeline=/nonexistent", "--prompt=x", "--steps=0"], "--steps: must be >= 1"),
    (["--pipeline=/nonexistent", "--prompt=x"], "pipeline: folder not found: /nonexistent"),
  ],
)
def test_command_errors(argv, msg):
  with pytest.raises((ValueError, FileNotFoundError), match=f"^{msg}"):
    cli.main(["ddx", "txt2img", *argv])
