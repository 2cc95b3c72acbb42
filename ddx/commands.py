"""The ``train``, ``sample`` and ``info`` commands (registered into `ddx.cli`).

    python -m ddx train  --config=configs/digits.py --workdir=runs/digits [--config.train.total_steps=...]
    python -m ddx sample --workdir=runs/digits [--sampler=ddim --steps=50 --num=64 --eta=0 --guidance=2 --label=3]
    python -m ddx info   [--config=configs/cifar10.py]

Configs are read here and only here: everything below receives explicit arguments.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ddx.cli import FLAGS, register

config_flags.DEFINE_config_file("config", None, "train/info: an ml_collections config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_integer("stop_after_steps", None, "train: stop (with a checkpoint) after this many steps.")
flags.DEFINE_string("coordinator", None, "train/sample: multi-process coordinator address host:port.")
flags.DEFINE_integer("num_processes", None, "train/sample: number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "train/sample: this process's index (with --coordinator).")
flags.DEFINE_string("sampler", None, "sample: ddpm | ddim | plms | dpm_solver++ (default: config sample.sampler).")
flags.DEFINE_integer("steps", None, "sample: sampling steps (default: config sample.steps).")
flags.DEFINE_integer("num", None, "sample: number of samples (default: config sample.num).")
flags.DEFINE_float("eta", None, "sample: DDIM eta (default: config sample.eta).")
flags.DEFINE_float("guidance", None, "sample: classifier-free guidance scale (class-conditional models).")
flags.DEFINE_integer("label", None, "sample: class label for every sample (default: cycle 0..num_classes-1).")
flags.DEFINE_integer("seed", 0, "sample: PRNG seed.")
flags.DEFINE_integer("checkpoint_step", None, "sample: checkpoint step (default: the latest).")
flags.DEFINE_bool("use_ema", True, "sample: use the EMA weights (else the raw params).")
flags.DEFINE_string("out", None, "sample: output prefix (default: <workdir>/samples/sample_<step>_<sampler><steps>).")


def _init_distributed() -> None:
  from ddx import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


def _config() -> dict:
  from ddx import config as config_lib  # pylint: disable=import-outside-toplevel
  if FLAGS.config is None:
    raise app.UsageError("--config is required")
  return config_lib.validate(FLAGS.config)


def cmd_train(argv: list[str]) -> int:
  """Train (or resume) in --workdir with --config."""
  if argv:
    raise app.UsageError(f"train: unexpected arguments {argv}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  cfg = _config()  # validated before any JAX work
  _init_distributed()
  import ddx  # pylint: disable=import-outside-toplevel
  from ddx import config as config_lib, data, loop  # pylint: disable=import-outside-toplevel
  from ddx.models import UNet  # pylint: disable=import-outside-toplevel

  d = cfg["data"]
  source = data.make_source(d["name"], split=d["split"], data_dir=d["data_dir"], image_size=d["image_size"] or None)
  h, w, c = source.image_shape
  m = cfg["model"]
  if (m["image_size"], m["in_channels"]) != (h, c):
    raise ValueError(f"model: image_size/in_channels ({m['image_size']}, {m['in_channels']}) do not match "
                     f"the data ({h}, {c})")
  if m["num_classes"] and source.num_classes > m["num_classes"]:
    raise ValueError(f"model.num_classes: {m['num_classes']} < the data's {source.num_classes} classes")
  t = cfg["train"]
  spec = loop.LoopSpec(
      seed=cfg["seed"], global_batch_size=t["global_batch_size"], total_steps=t["total_steps"],
      steps_per_call=t["steps_per_call"], random_flip=d["random_flip"], num_threads=d["num_threads"],
      ema_decay=t["ema_decay"], ema_warmup=t["ema_warmup"], label_dropout=t["label_dropout"],
      log_every_seconds=t["log_every_seconds"], checkpoint_every=t["checkpoint_every"],
      keep_checkpoints=t["keep_checkpoints"], keep_period=t["keep_period"], sample_every=t["sample_every"],
      max_nonfinite=t["max_nonfinite"])
  s = cfg["sample"]
  sample = loop.SampleSpec(
      sampler=s["sampler"], steps=s["steps"], num=s["num"], guidance=s["guidance"],
      sampler_kwargs=config_lib.sampler_kwargs(cfg["diffusion"], sampler=s["sampler"], eta=s["eta"],
                                               clip_sample=s["clip_sample"]))
  sched = ddx.schedules.make(**config_lib.schedule_kwargs(cfg))
  summary = loop.run(
      os.path.abspath(FLAGS.workdir), cfg, model_factory=lambda rngs: UNet(**m, rngs=rngs),
      num_classes=m["num_classes"], use_dropout=m["dropout"] > 0, source=source, sched=sched,
      optim=config_lib.optimizer_spec(cfg), loss=config_lib.loss_spec(cfg), loop=spec, sample=sample,
      stop_after_steps=FLAGS.stop_after_steps)
  summary.pop("state")
  if summary["preempted"]:
    print(f"stopped at step {summary['step']} after a preemption signal; rerun the same command to resume")
  print("summary: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}))
  return 0


def cmd_sample(argv: list[str]) -> int:
  """Sample from the checkpoint in --workdir; writes a PNG grid and an .npz."""
  if argv:
    raise app.UsageError(f"sample: unexpected arguments {argv}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  from ddx import checkpoint  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(FLAGS.workdir)
  cfg = checkpoint.read_config(workdir)  # clear error for a missing / empty workdir
  checkpoint.resolve_step(workdir, FLAGS.checkpoint_step)  # a clear error if there is none
  sample_cfg = cfg.get("sample", {})
  sampler_name = FLAGS.sampler or sample_cfg.get("sampler", "ddim")
  steps = FLAGS.steps or sample_cfg.get("steps", 50)
  num = FLAGS.num or sample_cfg.get("num", 64)
  eta = FLAGS.eta if FLAGS.eta is not None else sample_cfg.get("eta", 0.0)
  scale = FLAGS.guidance if FLAGS.guidance is not None else sample_cfg.get("guidance", 1.0)
  num_classes = cfg["model"].get("num_classes")
  if FLAGS.label is not None and not num_classes:
    raise ValueError("label: this model is unconditional")
  if FLAGS.label is not None and not 0 <= FLAGS.label <= num_classes:
    raise ValueError(f"label: must be in [0, {num_classes}] ({num_classes} = unconditional), got {FLAGS.label}")
  if num < 1:
    raise ValueError(f"num: must be >= 1, got {num}")
  _init_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import ddx  # pylint: disable=import-outside-toplevel
  from ddx import config as config_lib, images, loop, parallel  # pylint: disable=import-outside-toplevel

  diffusion = cfg["diffusion"]
  kwargs = config_lib.sampler_kwargs(diffusion, sampler=sampler_name, eta=eta,
                                     clip_sample=sample_cfg.get("clip_sample", True))
  sched_kwargs = dict(name=diffusion.get("beta_schedule", "linear"), num_timesteps=diffusion.get("num_timesteps", 1000),
                      rescale_zero_snr=diffusion.get("rescale_zero_snr", False))
  if sched_kwargs["name"] not in ("cosine", "squaredcos_cap_v2"):
    sched_kwargs.update(beta_start=diffusion.get("beta_start", 1e-4), beta_end=diffusion.get("beta_end", 0.02))
  sched = ddx.schedules.make(**sched_kwargs)
  ddx.samplers.make(sampler_name, sched, steps, **kwargs)  # validate before restoring weights
  which = "ema_params" if FLAGS.use_ema else "params"
  model, _ = checkpoint.restore_params(workdir, which=which, step=FLAGS.checkpoint_step)
  step = FLAGS.checkpoint_step if FLAGS.checkpoint_step is not None else checkpoint.latest_step(workdir)
  graphdef, params = nnx.split(model, nnx.Param)
  mesh = parallel.data_mesh()
  spec = loop.SampleSpec(sampler=sampler_name, steps=steps, num=num, sampler_kwargs=kwargs, guidance=scale)
  fn = loop.make_sample_fn(graphdef, sched, spec, num_classes, mesh)
  labels = None
  if num_classes:
    labels = np.full((num,), FLAGS.label, np.int32) if FLAGS.label is not None else \
        (np.arange(num) % num_classes).astype(np.int32)
  size, ch = cfg["model"]["image_size"], cfg["model"]["in_channels"]
  import time  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  x = loop.to_host(fn(params, jax.random.key(FLAGS.seed), (num, size, size, ch), labels))
  dt = time.time() - t0
  if jax.process_index() == 0:
    prefix = FLAGS.out or os.path.join(workdir, "samples", f"sample_{step:08d}_{sampler_name.replace('+', 'p')}{steps}")
    png, npz = images.save_samples(prefix, x, labels, scale=max(1, 128 // size))
    print(f"wrote {png} and {npz} ({num} samples, {sampler_name} {steps} steps, {dt:.1f}s incl. compile)")
  return 0


def cmd_info(argv: list[str]) -> int:
  """Every process prints the devices it drives; with --config, process 0 also prints the
  parameter count and mesh."""
  if argv:
    raise app.UsageError(f"info: unexpected arguments {argv}")
  cfg = _config() if FLAGS.config is not None else None
  _init_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  from ddx import parallel  # pylint: disable=import-outside-toplevel
  from ddx.models.unet import unet_param_count  # pylint: disable=import-outside-toplevel

  # one write() per line: every process shares the launcher's stdout, and a pipe keeps a
  # write of under 4 KiB whole, so lines of different processes never interleave
  sys.stdout.flush()
  os.write(sys.stdout.fileno(), (parallel.format_device_report(parallel.device_report()) + "\n").encode())
  if cfg is None or jax.process_index() != 0:
    return 0
  mesh = parallel.data_mesh()
  n = unet_param_count(**cfg["model"])
  b = cfg["train"]["global_batch_size"]
  print(f"model:   UNet, {n:,} parameters ({n * 4 / 2**20:.1f} MiB float32)")
  print(f"data:    {cfg['data']['name']} at {cfg['model']['image_size']}x{cfg['model']['image_size']}x"
        f"{cfg['model']['in_channels']}")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} processes, "
        f"backend {jax.default_backend()})")
  print(f"mesh:    {dict(mesh.shape)}; global batch {b} -> {b / jax.device_count():g} per device")
  return 0


register("train", cmd_train, "train (or resume) a model: --config=... --workdir=...")
register("sample", cmd_sample, "sample from a workdir's checkpoint: --workdir=... [--sampler --steps --num ...]")
register("info", cmd_info, "print the devices of every process [and parameter count, mesh for --config]")
