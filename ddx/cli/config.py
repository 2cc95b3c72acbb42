"""Config validation and translation.

The commands hand their ml_collections config (or a workdir's config.json) to this module
and to nothing else. `validate` checks every key against the schema in
`ddx.cli.defaults` (unknown keys, types, ranges, cross-field consistency) and raises a
one-line ``ValueError("<section.key>: ...")`` before anything is built or compiled. The
``*_spec`` / ``*_config`` / ``*_kwargs`` helpers translate sections into the explicit
arguments that library code takes; each choice set is imported from the module that owns
the concept.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from ddx import diffusion, losses, parallel, schedules
from ddx.cli import defaults as config_defaults
from ddx.cli import limits
from ddx.data.sources import DATASETS
from ddx.eval import inception, quality
from ddx.models.configs import AutoencoderConfig, UNetConfig
from ddx.samplers import EDM_NAMES as EDM_SAMPLERS
from ddx.samplers import FLOW_NAMES as FLOW_SAMPLERS
from ddx.samplers import GRID_NAMES as SIGMA_SAMPLERS
from ddx.samplers import NAMES as SAMPLER_NAMES
from ddx.training import autoencoder as autoencoder_train
from ddx.training import checkpoint, loop
from ddx.training import step as train_lib


def _default_schema() -> dict:
  return to_dict(config_defaults.get_config())


def to_dict(cfg) -> dict:
  """ConfigDict (or mapping) -> plain nested dict with tuples as lists."""
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  out = {}
  for k, v in dict(cfg).items():
    if isinstance(v, Mapping):
      out[k] = to_dict(v)
    elif isinstance(v, tuple):
      out[k] = list(v)
    else:
      out[k] = v
  return out


def _check_keys(cfg: Mapping, schema: Mapping, prefix: str = "") -> None:
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if k not in schema:
      raise ValueError(f"{name}: unknown config key")
    if isinstance(schema[k], Mapping):
      if not isinstance(v, Mapping):
        raise ValueError(f"{name}: must be a section, got {v!r}")
      _check_keys(v, schema[k], name + ".")
  for k in schema:
    if k not in cfg:
      raise ValueError(f"{prefix}{k}: missing from the config")


_FROM_CFG = object()


def _num(cfg, key, lo=None, hi=None, *, integer=False, lo_open=False, hi_open=False, optional=False, value=_FROM_CFG):
  """The number at ``key`` ("section.field"), checked for type and range; ``optional``: None
  passes; ``value``: check this value (e.g. a list entry) under the name ``key``."""
  if value is _FROM_CFG:
    section, field = key.split(".") if "." in key else (None, key)
    v = cfg[section][field] if section else cfg[field]
  else:
    v = value
  if optional and v is None:
    return None
  ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
  if isinstance(v, bool) or not ok_type:
    raise ValueError(f"{key}: must be {'an integer' if integer else 'a number'}, got {v!r}")
  if not math.isfinite(v):
    raise ValueError(f"{key}: must be a finite number, got {v}")
  if lo is not None and (v <= lo if lo_open else v < lo):
    raise ValueError(f"{key}: must be {'>' if lo_open else '>='} {lo}, got {v}")
  if hi is not None and (v >= hi if hi_open else v > hi):
    raise ValueError(f"{key}: must be {'<' if hi_open else '<='} {hi}, got {v}")
  return v


# The ranges of the model section's numbers (UNetConfig fields, in its order; a sequence's
# entries are checked one by one): what a config may ask for. UNetConfig checks the rest.
_MODEL_RANGES = {
  "image_size": dict(lo=1, hi=limits.MAX_IMAGE_SIZE, integer=True),
  "in_channels": dict(lo=1, hi=limits.MAX_CHANNELS, integer=True),
  "out_channels": dict(lo=1, hi=limits.MAX_CHANNELS, integer=True, optional=True),
  "base_channels": dict(lo=1, hi=limits.MAX_CHANNELS, integer=True),
  "channel_mult": dict(lo=1, hi=limits.MAX_CHANNEL_MULT, integer=True),
  "num_res_blocks": dict(lo=1, hi=limits.MAX_RES_BLOCKS, integer=True),
  "attention_resolutions": dict(lo=1, hi=limits.MAX_IMAGE_SIZE, integer=True),
  "num_heads": dict(lo=1, hi=limits.MAX_HEADS, integer=True),
  "head_dim": dict(lo=1, hi=limits.MAX_CHANNELS, integer=True, optional=True),
  "dropout": dict(lo=0, hi=1, hi_open=True),
  "norm_num_groups": dict(lo=1, hi=limits.MAX_CHANNELS, integer=True),
  "norm_eps": dict(lo=0, lo_open=True),
  "freq_shift": dict(),
  # None is unconditional; 0 is not a second spelling of it
  "num_classes": dict(lo=1, hi=limits.MAX_CLASSES, integer=True, optional=True),
}
_SEQUENCE_FIELDS = ("channel_mult", "attention_resolutions")


def _check_model(cfg: dict) -> None:
  """Ranges of the model section; then `ddx.models.UNetConfig` checks its consistency."""
  for name, bounds in _MODEL_RANGES.items():
    v = cfg["model"][name]
    if name not in _SEQUENCE_FIELDS:
      _num(cfg, f"model.{name}", **bounds)
    elif isinstance(v, (list, tuple)):  # anything else: UNetConfig's own one-line error
      for i, x in enumerate(v):
        _num(cfg, f"model.{name}[{i}]", value=x, **bounds)


def model_config(cfg: Mapping) -> UNetConfig:
  """The `ddx.models.UNetConfig` of a config's ``model`` section (one-line ValueError naming
  ``model.<field>``)."""
  try:
    return UNetConfig.from_json(cfg["model"])
  except ValueError as e:
    raise ValueError(f"model.{e}") from None


def _choice(cfg, key, choices):
  section, field = key.split(".")
  v = cfg[section][field]
  if v not in choices:
    raise ValueError(f"{key}: must be one of {tuple(choices)}, got {v!r}")
  return v


def validate(config) -> dict:
  """Validate a config; return it as a plain dict. Raises ValueError naming the key."""
  cfg = to_dict(config)
  _check_keys(cfg, _default_schema())
  if cfg["kind"] not in checkpoint.KINDS:
    raise ValueError(f"kind: must be one of {checkpoint.KINDS}, got {cfg['kind']!r}")
  _num(cfg, "seed", 0, limits.MAX_SEED, integer=True)
  _choice(cfg, "data.name", DATASETS)
  _num(cfg, "data.image_size", 0, limits.MAX_IMAGE_SIZE, integer=True)
  _num(cfg, "data.num_threads", 0, limits.MAX_THREADS, integer=True)
  _choice(cfg, "diffusion.beta_schedule", schedules.SCHEDULE_NAMES)
  _num(cfg, "diffusion.num_timesteps", 1, limits.MAX_TIMESTEPS, integer=True)
  _num(cfg, "diffusion.beta_start", 0, 1, lo_open=True)
  _num(cfg, "diffusion.beta_end", 0, 1, lo_open=True)
  _choice(cfg, "diffusion.prediction", diffusion.PREDICTIONS)
  _choice(cfg, "diffusion.variance", diffusion.VARIANCES)
  _choice(cfg, "diffusion.loss_weighting", losses.WEIGHTINGS)
  _num(cfg, "diffusion.min_snr_gamma", 0, lo_open=True)
  _num(cfg, "diffusion.vlb_weight", 0)
  _choice(cfg, "diffusion.kind", losses.KINDS)
  _choice(cfg, "diffusion.flow_timesteps", losses.FLOW_TIMESTEPS)
  _num(cfg, "diffusion.flow_logit_mean", -10, 10)
  _num(cfg, "diffusion.flow_logit_std", 0, 10, lo_open=True)
  _num(cfg, "diffusion.flow_shift", 0, 100, lo_open=True)
  _num(cfg, "diffusion.edm_sigma_data", 0, 100, lo_open=True)
  _num(cfg, "diffusion.edm_p_mean", -10, 10)
  _num(cfg, "diffusion.edm_p_std", 0, 10, lo_open=True)
  kind = cfg["diffusion"]["kind"]
  if kind != "ddpm" and cfg["model"]["learn_sigma"]:
    raise ValueError(f"diffusion.kind: a {kind!r} model has no learned variance (model.learn_sigma=False)")
  for key in ("sample.sampler", "eval.sampler"):
    section, field = key.split(".")
    name = (cfg.get(section) or {}).get(field)
    if name is not None:
      _check_sampler_kind(kind, name, key)
  if cfg["diffusion"]["rescale_zero_snr"] and cfg["diffusion"]["prediction"] == "eps":
    raise ValueError("diffusion.prediction: 'eps' cannot be used with rescale_zero_snr (use 'v')")
  if (cfg["diffusion"]["variance"] == "learned_range") != bool(cfg["model"]["learn_sigma"]):
    raise ValueError("diffusion.variance: 'learned_range' goes with model.learn_sigma=True (and only with it)")
  t = cfg["train"]
  _num(cfg, "train.global_batch_size", 1, limits.MAX_BATCH, integer=True)
  _num(cfg, "train.total_steps", 1, limits.MAX_STEP, integer=True)
  _num(cfg, "train.steps_per_call", 1, limits.MAX_STEP, integer=True)
  _num(cfg, "train.grad_accum", 1, limits.MAX_BATCH, integer=True)
  if t["global_batch_size"] % t["grad_accum"]:
    raise ValueError(
      f"train.grad_accum: must divide train.global_batch_size={t['global_batch_size']}, got {t['grad_accum']}"
    )
  _num(cfg, "train.ema_decay", 0, 1)
  _num(cfg, "train.label_dropout", 0, 1)
  _num(cfg, "train.log_every_seconds", 0, lo_open=True)
  _num(cfg, "train.checkpoint_every", 1, limits.MAX_STEP, integer=True)
  _num(cfg, "train.keep_checkpoints", 1, limits.MAX_STEP, integer=True)
  _num(cfg, "train.keep_period", 0, limits.MAX_STEP, integer=True)
  _num(cfg, "train.sample_every", 0, limits.MAX_STEP, integer=True)
  _num(cfg, "train.eval_every", 0, limits.MAX_STEP, integer=True)
  _num(cfg, "train.max_nonfinite", 1, limits.MAX_STEP, integer=True)
  k = t["steps_per_call"]
  for key in ("total_steps", "checkpoint_every", "sample_every", "eval_every", "keep_period"):
    if t[key] % k:
      raise ValueError(f"train.{key}: {t[key]} must be a multiple of train.steps_per_call={k}")
  if t["label_dropout"] > 0 and not cfg["model"]["num_classes"]:
    raise ValueError("train.label_dropout: needs a class-conditional model (model.num_classes)")
  _num(cfg, "parallel.fsdp", 1, limits.MAX_DEVICES, integer=True)
  _num(cfg, "parallel.fsdp_min_size", 0, limits.MAX_STEP, integer=True)
  sharding_rules(cfg)
  if cfg["parallel"]["peak_tflops"] is not None:
    _num(cfg, "parallel.peak_tflops", 0, lo_open=True)
  _choice(cfg, "optim.name", train_lib.OPTIMIZERS)
  _choice(cfg, "optim.decay", train_lib.LR_DECAYS)
  _num(cfg, "optim.learning_rate", 0, lo_open=True)
  _num(cfg, "optim.warmup_steps", 0, limits.MAX_STEP, integer=True)
  _num(cfg, "optim.final_lr_fraction", 0, 1)
  _num(cfg, "optim.b1", 0, 1)
  _num(cfg, "optim.b2", 0, 1)
  _num(cfg, "optim.eps", 0, lo_open=True)
  _num(cfg, "optim.weight_decay", 0)
  _num(cfg, "optim.grad_clip", 0)
  _choice(cfg, "sample.sampler", SAMPLER_NAMES)
  _num(cfg, "sample.steps", 1, cfg["diffusion"]["num_timesteps"], integer=True)
  _num(cfg, "sample.eta", 0, limits.MAX_ETA)
  _num(cfg, "sample.num", 1, limits.MAX_SAMPLES, integer=True)
  _num(cfg, "sample.guidance", limits.MIN_GUIDANCE, limits.MAX_GUIDANCE)
  _check_model(cfg)
  _check_eval(cfg)
  if cfg["kind"] == "autoencoder":
    if t["grad_accum"] != 1:
      raise ValueError("train.grad_accum: gradient accumulation is for diffusion models; use 1 for an autoencoder")
    _check_autoencoder(cfg)
    return cfg  # the model section describes a denoiser: not used
  latent = _check_latent(cfg)
  # data / model consistency
  size = cfg["data"]["image_size"]
  if size and size != cfg["model"]["image_size"] and not latent:
    raise ValueError(f"model.image_size: {cfg['model']['image_size']} differs from data.image_size={size}")
  model_config(cfg)
  return cfg


def _check_autoencoder(cfg: dict) -> None:
  _choice(cfg, "autoencoder.reconstruction", autoencoder_train.RECONSTRUCTIONS)
  _num(cfg, "autoencoder.kl_weight", 0)
  _num(cfg, "autoencoder.holdout", 0, limits.MAX_SAMPLES, integer=True)
  ae = autoencoder_config(cfg, in_channels=1)  # the data's channel count is checked by the train command
  f = 2 ** (len(ae.block_out_channels) - 1)
  size = cfg["data"]["image_size"]
  if size and size % f:
    raise ValueError(f"data.image_size: {size} must be divisible by the autoencoder's downscale {f}")
  for key in ("sample_every", "eval_every"):
    if cfg["train"][key]:
      raise ValueError(
        f"train.{key}: must be 0 for kind='autoencoder' (the train command reports held-out "
        f"reconstructions instead), got {cfg['train'][key]}"
      )
  if cfg["latent"]["autoencoder_workdir"] is not None:
    raise ValueError("latent.autoencoder_workdir: must be None for kind='autoencoder'")


def _check_latent(cfg: dict) -> dict | None:
  """The latent section of a diffusion config; the autoencoder's config.json if it names one."""
  lat = cfg["latent"]
  if lat["scaling_factor"] is not None:
    _num(cfg, "latent.scaling_factor", 0, lo_open=True)
  if lat["autoencoder_step"] is not None:
    _num(cfg, "latent.autoencoder_step", 0, limits.MAX_STEP, integer=True)
  if lat["autoencoder_workdir"] is None:
    for key in ("scaling_factor", "autoencoder_step"):
      if lat[key] is not None:
        raise ValueError(f"latent.{key}: needs latent.autoencoder_workdir")
    return None
  ae = checkpoint.read_trained_config(lat["autoencoder_workdir"], "autoencoder", name="latent.autoencoder_workdir")
  where = f"the autoencoder in {lat['autoencoder_workdir']}"
  if lat["autoencoder_step"] is not None and lat["autoencoder_step"] not in checkpoint.all_steps(
    lat["autoencoder_workdir"]
  ):
    raise ValueError(
      f"latent.autoencoder_step: {where} has no checkpoint {lat['autoencoder_step']} "
      f"(it has {checkpoint.all_steps(lat['autoencoder_workdir'])})"
    )
  ae_data = ae.get("data") or {}
  for key in ("name", "image_size"):
    if key in ae_data and ae_data[key] != cfg["data"][key]:
      raise ValueError(f"data.{key}: {cfg['data'][key]!r} differs from {ae_data[key]!r}, the data of {where}")
  m, am = cfg["model"], ae["model"]
  if m["in_channels"] != am["latent_channels"]:
    raise ValueError(
      f"model.in_channels: must be {am['latent_channels']}, the latent channels of {where}, got {m['in_channels']}"
    )
  f = 2 ** (len(am["block_out_channels"]) - 1)
  if cfg["data"]["image_size"] and m["image_size"] * f != cfg["data"]["image_size"]:
    raise ValueError(
      f"model.image_size: must be {cfg['data']['image_size'] // f} (data.image_size "
      f"{cfg['data']['image_size']} / the downscale {f} of {where}), got {m['image_size']}"
    )
  if cfg["sample"]["clip_sample"]:
    raise ValueError("sample.clip_sample: must be False for a latent model (latents are not in [-1, 1])")
  if cfg["train"]["eval_every"]:
    raise ValueError(
      "train.eval_every: must be 0 for a latent model (evaluation of decoded samples during "
      f"training is not supported), got {cfg['train']['eval_every']}"
    )
  return ae


def autoencoder_config(cfg: Mapping, in_channels: int) -> AutoencoderConfig:
  """The `ddx.models.AutoencoderConfig` of a config's ``autoencoder`` section (images of
  ``in_channels`` channels; scaling factor 1: a latent model estimates its own)."""
  a = cfg["autoencoder"]
  try:
    return AutoencoderConfig(
      in_channels=in_channels,
      out_channels=in_channels,
      block_out_channels=a["block_out_channels"],
      layers_per_block=a["layers_per_block"],
      latent_channels=a["latent_channels"],
      norm_num_groups=a["norm_num_groups"],
      scaling_factor=1.0,
      mid_block_add_attention=a["mid_block_add_attention"],
    )
  except ValueError as e:
    raise ValueError(f"autoencoder.{e}") from None


def autoencoder_loss_spec(cfg: Mapping):
  a = cfg["autoencoder"]
  return autoencoder_train.AutoencoderLossSpec(reconstruction=a["reconstruction"], kl_weight=a["kl_weight"])


def _check_eval(cfg: dict) -> None:
  _choice(cfg, "eval.features", quality.FEATURES)
  _choice(cfg, "eval.sampler", SAMPLER_NAMES)
  _num(cfg, "eval.num", 2, limits.MAX_SAMPLES, integer=True)
  _num(cfg, "eval.batch", 1, limits.MAX_BATCH, integer=True)
  _num(cfg, "eval.steps", 1, cfg["diffusion"]["num_timesteps"], integer=True)
  _num(cfg, "eval.eta", 0, limits.MAX_ETA)
  e = cfg["eval"]
  for key in ("inception_weights", "cache_dir"):
    if e[key] is not None and not isinstance(e[key], str):
      raise ValueError(f"eval.{key}: must be a path, got {e[key]!r}")
  if not cfg["train"]["eval_every"]:
    return  # the rest only matters when training evaluates
  m = cfg["model"]
  quality.check_features(e["features"], (m["image_size"], m["image_size"], m["in_channels"]), name="eval.features")
  if e["features"] == "inception":
    if not e["inception_weights"]:
      raise ValueError(
        "eval.inception_weights: required with eval.features='inception' (ddx never downloads "
        f"weights: pass the path of {inception.OFFICIAL_FILE} or its .safetensors copy)"
      )
    if not os.path.isfile(e["inception_weights"]):
      raise ValueError(f"eval.{inception.missing_file_error(e['inception_weights'])}")


def schedule_kwargs(diffusion_section: Mapping) -> dict:
  """`ddx.schedules.make` arguments for a ``diffusion`` section (a validated config's, or a
  workdir's config.json, where converted models may omit keys: the schema defaults apply)."""
  d = {**_default_schema()["diffusion"], **{k: v for k, v in diffusion_section.items() if v is not None}}
  name = schedules.canonical_name(d["beta_schedule"])
  kw = dict(name=name, num_timesteps=d["num_timesteps"], rescale_zero_snr=bool(d["rescale_zero_snr"]))
  if name != "cosine":
    kw.update(beta_start=d["beta_start"], beta_end=d["beta_end"])
  return kw


def optimizer_spec(cfg: Mapping) -> train_lib.OptimizerSpec:
  o = cfg["optim"]
  return train_lib.OptimizerSpec(
    name=o["name"],
    learning_rate=o["learning_rate"],
    warmup_steps=o["warmup_steps"],
    decay=o["decay"],
    total_steps=cfg["train"]["total_steps"],
    final_lr_fraction=o["final_lr_fraction"],
    b1=o["b1"],
    b2=o["b2"],
    eps=o["eps"],
    weight_decay=o["weight_decay"],
    grad_clip=o["grad_clip"],
  )


def loop_spec(cfg: Mapping) -> loop.LoopSpec:
  """The loop settings of a validated config (`ddx.training.loop.run`)."""
  t, d = cfg["train"], cfg["data"]
  return loop.LoopSpec(
    seed=cfg["seed"],
    global_batch_size=t["global_batch_size"],
    total_steps=t["total_steps"],
    steps_per_call=t["steps_per_call"],
    grad_accum=t["grad_accum"],
    random_flip=d["random_flip"],
    num_threads=d["num_threads"],
    ema_decay=t["ema_decay"],
    ema_warmup=t["ema_warmup"],
    label_dropout=t["label_dropout"],
    log_every_seconds=t["log_every_seconds"],
    checkpoint_every=t["checkpoint_every"],
    keep_checkpoints=t["keep_checkpoints"],
    keep_period=t["keep_period"],
    sample_every=t["sample_every"],
    eval_every=t["eval_every"],
    max_nonfinite=t["max_nonfinite"],
    fsdp=cfg["parallel"]["fsdp"],
    sharding_rules=sharding_rules(cfg),
    peak_tflops=cfg["parallel"]["peak_tflops"],
  )


def sharding_rules(cfg: Mapping) -> parallel.ShardingRules:
  """The ``parallel`` section's rule table (`ddx.parallel.ShardingRules`)."""
  p = cfg["parallel"]
  overrides = p["fsdp_overrides"]
  if isinstance(overrides, str):  # a single rule given on the command line
    overrides = (overrides,)
  if not isinstance(overrides, (list, tuple)):
    raise ValueError(f"parallel.fsdp_overrides: must be a tuple of 'REGEX=DIM' strings, got {overrides!r}")
  return parallel.ShardingRules.parse(p["fsdp_min_size"], overrides)


def loss_spec(cfg: Mapping) -> train_lib.LossSpec:
  d = cfg["diffusion"]
  return train_lib.LossSpec(
    prediction=d["prediction"],
    weighting=d["loss_weighting"],
    min_snr_gamma=d["min_snr_gamma"],
    learned_variance=bool(cfg["model"]["learn_sigma"]),
    vlb_weight=d["vlb_weight"],
    kind=d.get("kind", "ddpm"),
    flow_timesteps=d.get("flow_timesteps", "uniform"),
    flow_mean=float(d.get("flow_logit_mean", 0.0)),
    flow_std=float(d.get("flow_logit_std", 1.0)),
    flow_shift=float(d.get("flow_shift", 1.0)),
    edm_sigma_data=float(d.get("edm_sigma_data", 0.5)),
    edm_p_mean=float(d.get("edm_p_mean", -1.2)),
    edm_p_std=float(d.get("edm_p_std", 1.2)),
  )


# the samplers of each diffusion.kind: flow and EDM models have their own
_KIND_SAMPLERS = {"flow": FLOW_SAMPLERS, "edm": EDM_SAMPLERS}


def _check_sampler_kind(kind: str, sampler: str, name: str) -> None:
  own = _KIND_SAMPLERS.get(kind)
  if own is not None and sampler not in own:
    raise ValueError(f"{name}: a diffusion.kind={kind!r} model samples with one of {own}, got {sampler!r}")
  if own is None and sampler in FLOW_SAMPLERS + EDM_SAMPLERS:
    raise ValueError(f"{name}: {sampler!r} is for diffusion.kind 'flow' / 'edm' models; this one is {kind!r}")


def edm_sigma_data(diffusion: Mapping) -> float | None:
  """σ_d of an EDM model's preconditioning (`ddx.edm`), None for the other kinds."""
  return float(diffusion.get("edm_sigma_data", 0.5)) if diffusion.get("kind") == "edm" else None


def sampler_kwargs(
  diffusion: Mapping, *, sampler: str, eta: float, clip_sample: bool, sigmas: str | None = None
) -> dict:
  """Keyword arguments of `ddx.samplers.make` for a trained model's diffusion section;
  ``sigmas`` (a noise-level grid) only for the σ-space samplers."""
  kind = diffusion.get("kind", "ddpm")
  _check_sampler_kind(kind, sampler, "--sampler")
  if kind != "ddpm" and sigmas is not None:
    raise ValueError(f"--sigmas: the {kind} samplers use their own grid, got {sigmas}")
  if kind == "flow":
    return {"shift": float(diffusion.get("flow_shift", 1.0)), "num_train": int(diffusion["num_timesteps"])}
  if kind == "edm":
    return {}
  kw: dict[str, Any] = {"prediction": diffusion["prediction"]}
  if sigmas is not None:
    if sampler not in SIGMA_SAMPLERS:
      raise ValueError(f"--sigmas: only the samplers {SIGMA_SAMPLERS} take a noise-level grid, got {sampler}")
    kw["sigmas"] = sigmas
  if sampler == "ddpm":
    kw["variance"] = diffusion.get("variance", "fixed_large")
  if sampler in ("ddpm", "ddim"):
    kw["clip_sample"] = clip_sample
  if sampler == "ddim":
    kw["eta"] = eta
  elif sampler in ("plms", "dpm_solver++") and eta:
    kw["eta"] = eta  # rejected by the sampler with a clear message
  if sampler in ("ddim", "plms", "ddpm") and diffusion.get("rescale_zero_snr"):
    kw["spacing"] = "trailing"
  return kw
