"""ddx.models.CLIPTextEncoder vs transformers' CLIPTextModel (seeded random tiny configs)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddx.models import CLIPTextEncoder, clip_text_from_transformers
from tests._latent_refs import refs, save_perturbed

TINY = dict(
  vocab_size=50,
  hidden_size=16,
  intermediate_size=24,
  num_hidden_layers=2,
  num_attention_heads=2,
  max_position_embeddings=9,
  layer_norm_eps=1e-5,
)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def make_clip(path, seed=0, **changes):
  torch, _, transformers = refs()
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(**{**TINY, **changes})
  return save_perturbed(transformers.CLIPTextModel(config), path)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


# ids: row 0 ends in the end token (49 = the largest id) then padding with it; row 1 holds a
# larger id than the configured eos before its eos, so the two pooling rules disagree there.
IDS = np.array([[0, 5, 9, 33, 49, 49, 49], [0, 44, 7, 30, 12, 30, 30]])


@pytest.mark.torch
@pytest.mark.parametrize(
  "act,eos,layout",
  [
    ("quick_gelu", 2, "prefixed"),  # legacy argmax pooling, OpenAI activation
    ("gelu", 30, "bare"),  # first-eos pooling, OpenCLIP activation
  ],
)
def test_matches_transformers(tmp_path, act, eos, layout):
  import torch
  from safetensors.numpy import load_file, save_file

  tmodel = make_clip(tmp_path, hidden_act=act, eos_token_id=eos)
  fname = str(tmp_path / "model.safetensors")
  state = load_file(fname)
  bare = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in state.items()}
  save_file(bare if layout == "bare" else {"text_model." + k: v for k, v in bare.items()}, fname)
  model = clip_text_from_transformers(str(tmp_path))
  with torch.inference_mode():
    out = tmodel(torch.from_numpy(IDS))
  h, pooled = _apply(*nnx.split(model), jnp.asarray(IDS, jnp.int32))
  assert rel_err(h, out.last_hidden_state.numpy()) < 1e-5
  assert rel_err(pooled, out.pooler_output.numpy()) < 1e-5
  # the pooling rule really differs between the two conventions on row 1
  pos = 1 if eos == 2 else 3
  np.testing.assert_allclose(pooled[1], np.asarray(h)[1, pos], rtol=1e-6)


def test_bad_ids():
  m = nnx.eval_shape(lambda: CLIPTextEncoder(**TINY, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"^ids: 10 tokens exceed the text encoder's context of 9"):
    m(jnp.zeros((1, 10), jnp.int32))
  with pytest.raises(ValueError, match=r"^ids: token ids must be in \[0, 50\), got min 0 max 50$"):
    m(jnp.array([[0, 50]], jnp.int32))
  with pytest.raises(ValueError, match=r"^ids: expected token ids \[B, L\]"):
    m(jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="^hidden_act: must be one of"):
    CLIPTextEncoder(**TINY, hidden_act="relu", rngs=nnx.Rngs(0))


def test_unsupported_config(tmp_path):
  cfg = {**TINY, "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model"}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="^architectures: unsupported transformers CLIPTextModel"):
    clip_text_from_transformers(str(tmp_path))
  cfg = {**TINY, "hidden_act": "gelu_new"}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="^hidden_act: unsupported transformers CLIPTextModel"):
    clip_text_from_transformers(str(tmp_path))
  cfg = dict(TINY)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(FileNotFoundError, match="^text_encoder: missing weights file .*model.safetensors"):
    clip_text_from_transformers(str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="^text_encoder: no config.json in"):
    clip_text_from_transformers(str(tmp_path))
