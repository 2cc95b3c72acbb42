"""diffusers UNet2DModel import, workdir checkpoints and the ``python -m ddx convert`` command."""

import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddx.cli import main as cli
from ddx.cli import restore
from ddx.models import UNetConfig, abstract, from_diffusers, with_params
from ddx.models.io import diffusers as convert
from ddx.training import checkpoint
from tests._tiny import random_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Small diffusers configs (16x16): one with the google/ddpm-* options (TF padding, sin/cos,
# freq_shift 1, one head), one with diffusers defaults and 8-dim heads / attention at level 0.
SMALL_DDPM = dict(
  sample_size=16,
  in_channels=3,
  out_channels=3,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
  attention_head_dim=None,
  norm_num_groups=8,
  norm_eps=1e-6,
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
)
SMALL_DEFAULTS = dict(
  sample_size=16,
  in_channels=2,
  out_channels=4,
  block_out_channels=(32, 64),
  layers_per_block=2,
  down_block_types=("AttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "AttnUpBlock2D"),
  attention_head_dim=8,
  norm_num_groups=8,
)
CIFAR10 = dict(
  sample_size=32,
  in_channels=3,
  out_channels=3,
  block_out_channels=(128, 256, 256, 256),
  layers_per_block=2,
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  attention_head_dim=None,
  norm_eps=1e-6,
  norm_num_groups=32,
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, t):
  return nnx.merge(graphdef, state)(x, t)


def ddx_forward(model, x_nchw, t):
  graphdef, state = nnx.split(model)
  out = _apply(graphdef, state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t))
  return np.asarray(out).transpose(0, 3, 1, 2)


def torch_forward(tmodel, x_nchw, t):
  import torch

  with torch.inference_mode():
    return tmodel(torch.from_numpy(x_nchw), torch.from_numpy(np.asarray(t))).sample.numpy()


def rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def make_diffusers(path, config, seed=0, scheduler=None):
  """Random-init diffusers UNet2DModel (norm affines / biases perturbed too), saved to path."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
  if scheduler is not None:
    diffusers.DDPMScheduler(**scheduler).save_pretrained(os.path.join(path, "scheduler"))
  return model


def random_inputs(config, batch=2, seed=0, float_t=False):
  rng = np.random.RandomState(seed)
  s = config["sample_size"]
  x = rng.randn(batch, config["in_channels"], s, s).astype(np.float32)
  t = rng.uniform(0, 999, batch).astype(np.float32) if float_t else rng.randint(0, 1000, batch)
  return x, t


@pytest.fixture(scope="module")
def small_ddpm(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("small_ddpm"))
  tmodel = make_diffusers(path, SMALL_DDPM, scheduler=dict(variance_type="fixed_small", prediction_type="v_prediction"))
  return path, tmodel


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("config", [SMALL_DDPM, SMALL_DEFAULTS], ids=["ddpm", "defaults"])
@pytest.mark.parametrize("float_t", [False, True], ids=["int_t", "float_t"])
def test_matches_diffusers(tmp_path, config, float_t):
  tmodel = make_diffusers(str(tmp_path), config, seed=1)
  model = from_diffusers(str(tmp_path / "unet"))
  x, t = random_inputs(config, float_t=float_t)
  ref = torch_forward(tmodel, x, t)
  out = ddx_forward(model, x, t)
  chex.assert_shape(out, ref.shape)
  assert rel_err(out, ref) < 1e-4


@pytest.mark.slow
@pytest.mark.torch
def test_cifar10_config_matches_diffusers(tmp_path):
  tmodel = make_diffusers(str(tmp_path), CIFAR10, seed=2)
  model = from_diffusers(str(tmp_path))  # a pipeline folder with unet/ works too
  n_torch = sum(p.numel() for p in tmodel.parameters())
  n_ddx = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_torch == n_ddx == 35_746_307
  assert model.config == UNetConfig(
    image_size=32,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    num_heads=1,
    norm_num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
  )
  x, t = random_inputs(CIFAR10, batch=2, seed=3)
  assert rel_err(ddx_forward(model, x, t), torch_forward(tmodel, x, t)) < 1e-4


@pytest.mark.torch
def test_legacy_attention_names(small_ddpm, tmp_path):
  from safetensors.numpy import load_file, save_file

  path, _ = small_ddpm
  state = load_file(os.path.join(path, "unet", convert.WEIGHTS_NAME))
  renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
  legacy = {}
  for k, v in state.items():
    for new, old in renames.items():
      k = k.replace("." + new, "." + old)
    legacy[k] = v
  assert any(".proj_attn." in k for k in legacy)
  os.makedirs(tmp_path / "unet")
  save_file(legacy, str(tmp_path / "unet" / convert.WEIGHTS_NAME))
  with open(os.path.join(path, "unet", "config.json")) as f:
    (tmp_path / "unet" / "config.json").write_text(f.read())
  a = nnx.state(from_diffusers(path), nnx.Param)
  b = nnx.state(from_diffusers(str(tmp_path)), nnx.Param)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.slow
@pytest.mark.torch
def test_convert_cli_checkpoint_roundtrip(small_ddpm, tmp_path):
  path, tmodel = small_ddpm
  workdir = str(tmp_path / "work")
  proc = subprocess.run(
    [sys.executable, "-m", "ddx", "convert", f"--diffusers={path}/unet", f"--workdir={workdir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["model"] == convert.diffusers_to_unet_config(SMALL_DDPM).to_json()
  assert config["diffusion"] == {
    "num_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction": "v",
    "variance": "fixed_small",
    "rescale_zero_snr": False,
    "clip_sample": True,
  }
  assert checkpoint.all_steps(workdir) == [0]

  direct = from_diffusers(os.path.join(path, "unet"))
  for which in ("params", "ema_params"):
    model, cfg, _ = restore.load_model(workdir, which=which)
    assert cfg == config
    chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(direct, nnx.Param))
  x, t = random_inputs(SMALL_DDPM, seed=4)
  assert rel_err(ddx_forward(model, x, t), torch_forward(tmodel, x, t)) < 1e-4

  # converting into a workdir that already has checkpoints is refused
  proc = subprocess.run(
    [sys.executable, "-m", "ddx", "convert", f"--diffusers={path}/unet", f"--workdir={workdir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")},
  )
  assert proc.returncode != 0 and "already has checkpoints" in proc.stderr


@pytest.mark.torch
def test_convert_function_without_scheduler_uses_defaults(tmp_path):
  make_diffusers(str(tmp_path / "m"), SMALL_DDPM)
  _run_cli(["convert"], diffusers=str(tmp_path / "m" / "unet"), workdir=str(tmp_path / "w"))
  config = checkpoint.read_config(str(tmp_path / "w"))
  assert config["diffusion"] == convert.diffusers_scheduler_to_diffusion(None)
  assert config["diffusion"]["variance"] == "fixed_large"
  assert config["diffusion"]["prediction"] == "eps"
  model, _, _ = restore.load_model(str(tmp_path / "w"), dtype="bfloat16")
  assert model.config.dtype == "bfloat16"


def _run_cli(argv, **flag_values):
  """Run a cli command in-process (flags given as keyword arguments)."""
  return cli.main(["ddx"] + list(argv) + [f"--{k}={v}" for k, v in flag_values.items() if v is not None])


def test_cli_unknown_and_missing_command():
  with pytest.raises(cli.UsageError, match="unknown command 'bogus'"):
    _run_cli(["bogus"])
  with pytest.raises(cli.UsageError, match="missing command"):
    _run_cli([])
  with pytest.raises(ValueError, match="--diffusers: required"):
    _run_cli(["convert"], diffusers=None, workdir="/tmp/x")
  assert "convert" in cli.COMMANDS


# ------------------------------------------------------------------ config / file errors


def _write_config(path, **changes):
  cfg = {"_class_name": "UNet2DModel", **SMALL_DDPM, **changes}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(path)


@pytest.mark.parametrize(
  "changes,key",
  [
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
    (dict(up_block_types=("AttnUpBlock2D", "SkipUpBlock2D")), "up_block_types"),
    (dict(up_block_types=("UpBlock2D", "AttnUpBlock2D")), "up_block_types"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(center_input_sample=True), "center_input_sample"),
    (dict(add_attention=False), "add_attention"),
    (dict(block_out_channels=(32, 48)), "block_out_channels"),
    (dict(some_new_option=3), "some_new_option"),
    (dict(_class_name="UNet1DModel"), "_class_name"),
  ],
)
def test_unsupported_config_raises(tmp_path, changes, key):
  path = _write_config(tmp_path, **changes)  # no weights: the config is rejected first
  with pytest.raises(ValueError, match=f"^{key}: unsupported") as exc:
    from_diffusers(path)
  assert "\n" not in str(exc.value)


def test_invalid_derived_config_raises(tmp_path):
  path = _write_config(tmp_path, norm_num_groups=12)
  with pytest.raises(ValueError, match="norm_num_groups"):
    from_diffusers(path)


def test_missing_safetensors_raises(tmp_path):
  path = _write_config(tmp_path)
  with pytest.raises(ValueError, match=r"missing weights file .*diffusion_pytorch_model\.safetensors$"):
    from_diffusers(path)
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
    from_diffusers(path)
  with pytest.raises(FileNotFoundError, match="diffusers model folder not found"):
    from_diffusers(str(tmp_path / "does_not_exist"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json in"):
    from_diffusers(str(tmp_path / "empty"))


@pytest.mark.torch
def test_wrong_weights_raise(small_ddpm, tmp_path):
  from safetensors.numpy import load_file, save_file

  path, _ = small_ddpm
  state = load_file(os.path.join(path, "unet", convert.WEIGHTS_NAME))
  _write_config(tmp_path)
  fname = str(tmp_path / convert.WEIGHTS_NAME)
  save_file({k: v for k, v in state.items() if k != "conv_out.bias"}, fname)
  with pytest.raises(ValueError, match="^weights: missing tensor conv_out.bias in"):
    from_diffusers(str(tmp_path))
  save_file({**state, "extra.weight": np.zeros(3, np.float32)}, fname)
  with pytest.raises(ValueError, match="^weights: 1 unexpected tensors in the safetensors weights, e.g. extra.weight$"):
    from_diffusers(str(tmp_path))
  save_file({**state, "conv_out.bias": np.zeros(4, np.float32)}, fname)
  with pytest.raises(ValueError, match="conv_out.bias has shape"):
    from_diffusers(str(tmp_path))


def test_scheduler_mapping():
  d = convert.diffusers_scheduler_to_diffusion
  assert d({"beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range"}) == {
    "num_timesteps": 1000,
    "beta_schedule": "cosine",
    "beta_start": None,
    "beta_end": None,
    "prediction": "eps",
    "variance": "learned_range",
    "rescale_zero_snr": False,
    "clip_sample": True,
  }
  assert d({})["variance"] == "fixed_small"  # DDPMScheduler default
  assert d({"prediction_type": "sample"})["prediction"] == "x0"
  with pytest.raises(ValueError, match="^variance_type: "):
    d({"variance_type": "learned"})
  with pytest.raises(ValueError, match="^trained_betas: "):
    d({"trained_betas": [0.1, 0.2]})


# ------------------------------------------------------------------ checkpoints

TINY = dict(
  image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), norm_num_groups=4
)
DIFFUSION = convert.diffusers_scheduler_to_diffusion(None)


@pytest.fixture(scope="module")
def tiny_model():
  # seeded random weights made in numpy: nothing compiled (restoring is what is tested)
  config = UNetConfig(**TINY)
  return with_params(abstract(config), random_params(config, seed=0, scale=0.2))


def test_save_restore_all_items(tiny_model, tmp_path):
  import optax

  params = nnx.state(tiny_model, nnx.Param)
  ema = jax.tree.map(lambda p: p * 0.5, params)
  opt = optax.adam(1e-3)
  opt_state = opt.init(nnx.to_pure_dict(params))
  key_data = jax.random.key_data(jax.random.key(7))
  config = {"model": tiny_model.config.to_json(), "diffusion": DIFFUSION, "train": {"lr": 1e-3}}
  workdir = str(tmp_path)
  checkpoint.save(
    workdir,
    5,
    {
      "params": params,
      "ema_params": nnx.to_pure_dict(ema),
      "opt_state": opt_state,
      "train": {"step": 5, "key": key_data},
    },
    config,
  )
  checkpoint.save(workdir, 9, {"params": tiny_model, "ema_params": tiny_model})
  assert checkpoint.all_steps(workdir) == [5, 9] and checkpoint.latest_step(workdir) == 9

  model, cfg, _ = restore.load_model(workdir, step=5)
  assert cfg["train"] == {"lr": 1e-3} and cfg["model"] == tiny_model.config.to_json()
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(ema))
  model, _, _ = restore.load_model(workdir, which="params")  # latest = 9
  chex.assert_trees_all_equal(nnx.state(model, nnx.Param), params)

  step, items = checkpoint.restore(workdir, 5, {"opt_state": jax.eval_shape(lambda: opt_state), "train": None})
  assert step == 5
  chex.assert_trees_all_equal(items["opt_state"], opt_state)
  assert items["train"]["step"] == 5
  np.testing.assert_array_equal(np.asarray(items["train"]["key"], np.uint32), key_data)


def test_config_model_section_is_checked(tiny_model, tmp_path):
  with pytest.raises(ValueError, match="'diffusion' section"):
    checkpoint.save(str(tmp_path), 0, {"params": tiny_model}, {"model": tiny_model.config.to_json()})
  # checkpoint.py stores the model section as given; whoever builds the model validates it
  bad = str(tmp_path / "bad")
  checkpoint.save(bad, 0, {"params": tiny_model}, {"model": {**TINY, "norm_num_groups": 3}, "diffusion": DIFFUSION})
  with pytest.raises(ValueError, match="model section: norm_num_groups: "):
    restore.load_model(bad, which="params")
  checkpoint.write_config(str(tmp_path), {"model": TINY, "diffusion": DIFFUSION})
  with pytest.raises(ValueError, match="different model config"):
    checkpoint.write_config(str(tmp_path), {"model": {**TINY, "base_channels": 16}, "diffusion": DIFFUSION})


def test_restore_errors(tiny_model, tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=f"workdir does not exist: {missing}$"):
    restore.load_model(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json in workdir"):
    restore.load_model(str(empty))
  checkpoint.write_config(str(empty), {"model": TINY, "diffusion": DIFFUSION})
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints$"):
    restore.load_model(str(empty))
  # an interrupted save leaves only a temporary directory: still "no checkpoint"
  os.makedirs(empty / "checkpoints" / "3.orbax-checkpoint-tmp-1")
  with pytest.raises(FileNotFoundError, match="only incomplete entries: 3.orbax-checkpoint-tmp"):
    restore.load_model(str(empty))

  workdir = str(tmp_path / "w")
  checkpoint.save(workdir, 1, {"params": tiny_model}, {"model": tiny_model.config.to_json(), "diffusion": DIFFUSION})
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
    restore.load_model(workdir, which="params", step=2)
  with pytest.raises(ValueError, match="has no item 'ema_params'"):
    restore.load_model(workdir)  # converter-style default: EMA weights
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="config.json: invalid JSON"):
    restore.load_model(workdir, which="params")


def test_corrupt_checkpoint(tiny_model, tmp_path):
  workdir = str(tmp_path)
  checkpoint.save(
    workdir,
    0,
    {"params": tiny_model, "ema_params": tiny_model},
    {"model": tiny_model.config.to_json(), "diffusion": DIFFUSION},
  )
  item = os.path.join(workdir, "checkpoints", "0", "ema_params")
  for root, _, files in os.walk(item):  # truncate every data file of the item
    for name in files:
      with open(os.path.join(root, name), "wb"):
        pass
  with pytest.raises(ValueError, match=r"^corrupt or incomplete checkpoint .*/checkpoints/0: ") as e:
    restore.load_model(workdir)
  assert "\n" not in str(e.value)
  model, _, _ = restore.load_model(workdir, which="params")  # the other item is intact
  chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(tiny_model, nnx.Param))


def test_convert_from_and_into_a_bucket(small_ddpm, gcs, ddx_cli):
  """A diffusers folder read from a bucket, the workdir written to one: the same weights and
  settings as from the local folder."""
  import fsspec  # noqa: PLC0415

  path, _ = small_ddpm
  src, workdir = gcs.root("diffusers/small-ddpm"), gcs.root("converted/small-ddpm")
  fs, key = fsspec.core.url_to_fs(src)
  for root, _, names in os.walk(path):
    for n in names:
      fs.pipe_file(f"{key}/{os.path.relpath(os.path.join(root, n), path)}", open(os.path.join(root, n), "rb").read())
  code, out, err = ddx_cli("convert", f"--diffusers={src}", f"--workdir={workdir}")
  assert code == 0 and f"wrote {workdir}/config.json" in out, err[-2000:]
  config = checkpoint.read_config(workdir)
  assert config["source"] == {"format": "diffusers", "path": src}
  assert config["diffusion"]["prediction"] == "v" and config["diffusion"]["beta_schedule"] == "linear"
  model, _, step = restore.load_model(workdir)
  assert step == 0
  chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(from_diffusers(path), nnx.Param))
