"""Helpers for the latent-stack tests: reference imports and allocation-cheap random models
(`numpy_init`, from tests/_tiny.py).

`refs()` skips the calling test when a library is missing (a torchvision whose compiled ops
cannot load is handled by tests/_torchvision_compat.py, installed by conftest.py).
"""

import json
import os

import pytest
from flax import nnx


def refs():
  """``(torch, diffusers, transformers)``; skips the test if any is missing."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  torch.set_num_threads(1)
  return torch, diffusers, transformers


def save_perturbed(model, path):
  """Perturb the biases and norm affines of a freshly built reference ``model`` (their default
  zeros / ones would hide transposed or misrouted tensors), save it as safetensors in ``path``
  and return it (in eval mode). The perturbation continues torch's current random stream."""
  torch = refs()[0]
  model = model.eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(str(path), safe_serialization=True)
  return model


def abstract_tiny():
  """``(unet, vae)``: abstract (shape-only) tiny UNetCond and AutoencoderKL, for the tests of
  input checks that fail before any parameter is read."""
  from ddx.models import AutoencoderKL, UNetCond

  unet = nnx.eval_shape(
    lambda: UNetCond(
      block_out_channels=(16, 32),
      down_cross=(True, False),
      up_cross=(False, True),
      layers_per_block=1,
      num_heads=2,
      cross_attention_dim=12,
      norm_num_groups=4,
      rngs=nnx.Rngs(0),
    )
  )
  vae = nnx.eval_shape(lambda: AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, rngs=nnx.Rngs(0)))
  return unet, vae


# --- a tiny random Stable Diffusion pipeline folder -----------------------------------------

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


def build_sd_pipeline(path):
  """A tiny random Stable Diffusion pipeline saved as a diffusers folder under ``path``:
  ``(folder, the diffusers pipeline)`` (biases and norms perturbed, as `save_perturbed`)."""
  import pathlib

  torch, diffusers, transformers = refs()
  path = pathlib.Path(path)
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
