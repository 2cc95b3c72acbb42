"""The config schema and defaults: every key that exists, with the DDPM paper's values where they apply.

Sections: kind, data, model (exactly the fields of ddx.models.UNetConfig, built from the
dataclass: see its docstring for each), diffusion, train, optim, sample, autoencoder, latent,
eval. Dataset configs start from this one and override what they change; an unknown key
anywhere is an error (ddx.cli.config.validate). ``configs/default.py`` re-exports
this so that experiment files can start from it.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from ddx.models.configs import UNetConfig

# The model section's values where they differ from UNetConfig's defaults: a small U-Net for
# the 16x16 digits. dtype is spelled out (UNetConfig: None, the inputs' dtype) because a
# workdir's config.json records it, and a resumed run must write the same model section.
DIGITS_MODEL = dict(
  image_size=16,
  in_channels=1,
  base_channels=32,
  channel_mult=(1, 2, 2),
  attention_resolutions=(8,),
  dropout=0.1,
  norm_num_groups=8,
  dtype="float32",
)


def dataclass_section(cls, **values) -> ml_collections.ConfigDict:
  """A section holding every field of the dataclass ``cls``: ``values`` where given, else the
  field's default. A None default becomes a typed placeholder (``int | None`` ->
  ``placeholder(int)``) so that command-line overrides know the type to parse."""
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"{unknown[0]}: not a {cls.__name__} field")
  section = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    v = values.get(f.name, f.default)
    if v is dataclasses.MISSING:
      raise ValueError(f"{f.name}: {cls.__name__} has no default; give a value")
    if v is None:
      (kind,) = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
      v = config_dict.placeholder(kind)
    section[f.name] = v
  return section


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.kind = "diffusion"  # diffusion | autoencoder (ddx.training.checkpoint.KINDS): what `ddx train` trains

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | mnist | fashion_mnist | cifar10 | celeb_a | imagenet32 | imagenet64
  c.data.split = "train"
  c.data.data_dir = config_dict.placeholder(str)  # tfds data_dir (None: tfds default)
  c.data.image_size = 16  # resize to this square size (0: keep the source size)
  c.data.random_flip = False
  c.data.num_threads = 0  # grain read threads (0: in the main thread)

  c.model = dataclass_section(UNetConfig, **DIGITS_MODEL)  # num_classes None: unconditional

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000
  c.diffusion.beta_schedule = "linear"  # linear | scaled_linear | cosine | sigmoid
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.diffusion.rescale_zero_snr = False
  c.diffusion.prediction = "eps"  # eps | x0 | v
  c.diffusion.variance = "fixed_large"  # DDPM sampling variance: fixed_small | fixed_large | learned_range
  c.diffusion.loss_weighting = "uniform"  # uniform | min_snr
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.vlb_weight = 1e-3  # hybrid loss weight (learn_sigma models)
  # "ddpm": the variance-preserving process above; "flow": flow matching (rectified flow,
  # x = (1 - σ) x0 + σ eps, the velocity eps - x0 regressed; β schedule and prediction unused;
  # sample with flow_euler / flow_heun)
  c.diffusion.kind = "ddpm"
  c.diffusion.flow_timesteps = "uniform"  # uniform | logit_normal (SD3)
  c.diffusion.flow_logit_mean = 0.0
  c.diffusion.flow_logit_std = 1.0
  c.diffusion.flow_shift = 1.0  # SD3's timestep shift, in training and sampling (SD3: 3.0)
  # "edm": EDM's preconditioned network (ddx.edm), ln σ ~ N(edm_p_mean, edm_p_std²); sample
  # with edm_euler / edm_heun
  c.diffusion.edm_sigma_data = 0.5
  c.diffusion.edm_p_mean = -1.2
  c.diffusion.edm_p_std = 1.2

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 128
  c.train.total_steps = 800_000
  c.train.steps_per_call = 1  # train steps per jitted call (lax.scan)
  c.train.grad_accum = 1  # micro-batches per step: one update from k gradients of global_batch_size / k
  c.train.ema_decay = 0.9999
  c.train.ema_warmup = False  # decay min(ema_decay, (1+n)/(10+n))
  c.train.label_dropout = 0.0  # classifier-free guidance: P(label -> null)
  c.train.log_every_seconds = 5.0
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3  # keep the newest N ...
  c.train.keep_period = 0  # ... plus every checkpoint whose step is a multiple (0: none)
  c.train.sample_every = 10_000  # write a sample grid every M steps (0: never)
  c.train.eval_every = 0  # measure sample quality (the eval section) every M steps (0: never)
  c.train.max_nonfinite = 10  # stop after this many consecutive non-finite steps

  # The mesh: "fsdp" devices share one copy of the parameters, gradients, Adam moments and EMA
  # (each holds a slice), "data" takes the rest; the batch is split over both
  # (ddx.parallel.make_mesh, ddx.parallel.param_spec). fsdp=1: plain data parallelism.
  c.parallel = ml_collections.ConfigDict()
  c.parallel.fsdp = 1
  c.parallel.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated
  c.parallel.fsdp_overrides = ()  # ("REGEX=DIM" | "REGEX=none", ...) on parameter paths such as "mid/attn/qkv/kernel"
  c.parallel.peak_tflops = config_dict.placeholder(float)  # per device, for MFU when the device kind is not known

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"  # adam | adamw
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.decay = "constant"  # constant | cosine
  c.optim.final_lr_fraction = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ddim"  # ddpm | ddim | plms | dpm_solver++ | unipc | euler | heun | ... | flow_euler (flows)
  c.sample.steps = 50
  c.sample.eta = 0.0
  c.sample.num = 64
  c.sample.guidance = 1.0  # classifier-free guidance scale (class-conditional models)
  c.sample.clip_sample = True

  # kind="autoencoder": a KL autoencoder (ddx.models.AutoencoderKL) trained on the data with
  # reconstruction + kl_weight * KL (ddx.training.autoencoder); the model section is not used.
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.block_out_channels = (32, 64)  # the latent is 2^(len-1) times smaller per side
  c.autoencoder.layers_per_block = 1
  c.autoencoder.latent_channels = 4
  c.autoencoder.norm_num_groups = 8
  c.autoencoder.mid_block_add_attention = True
  c.autoencoder.reconstruction = "l1"  # l1 | l2
  c.autoencoder.kl_weight = 1e-6  # on the summed KL, against the summed reconstruction term
  c.autoencoder.holdout = 0  # the data's last N records: not trained on, reconstruction error reported

  # A latent diffusion model (kind="diffusion"): the model section describes the denoiser of the
  # autoencoder's latents (model.image_size / in_channels = the latent's side and channels).
  c.latent = ml_collections.ConfigDict()
  c.latent.autoencoder_workdir = config_dict.placeholder(str)  # None: a pixel-space model
  c.latent.autoencoder_step = config_dict.placeholder(int)  # None: its latest checkpoint
  c.latent.scaling_factor = config_dict.placeholder(float)  # None: 1 / std of the training latents

  # Sample quality during training (train.eval_every > 0): FD / KID / precision / recall of
  # eval.num samples (EMA weights) against the training data, into metrics.jsonl and
  # TensorBoard; the per-step x0 handling is sample.clip_sample's.
  c.eval = ml_collections.ConfigDict()
  c.eval.num = 1000
  c.eval.batch = 250  # sampling and feature batch size
  c.eval.features = "digits"  # digits (16x16x1 models) | inception
  c.eval.inception_weights = config_dict.placeholder(str)  # pytorch-fid's .pth or its .safetensors copy
  c.eval.cache_dir = config_dict.placeholder(str)  # reference statistics (None: <workdir>/eval_cache)
  c.eval.sampler = "ddim"  # ddpm | ddim | plms | dpm_solver++
  c.eval.steps = 50
  c.eval.eta = 0.0
  return c
