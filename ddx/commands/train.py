"""``python -m ddx train --config=configs/digits.py --workdir=runs/digits [--config.train.total_steps=...]``.

Trains (or resumes) in --workdir: the config is validated before anything is built, then
translated into the explicit arguments of `ddx.loop.run`. ``kind="autoencoder"`` configs and
latent diffusion configs (``latent.autoencoder_workdir``) are set up by
`ddx.commands._train_latent` (a helper module, not a command).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from ddx.commands import common

HELP = "train (or resume) a model: --config=... --workdir=..."
FLAGS = flags.FlagValues()
common.define_workdir(FLAGS)
config_flags.DEFINE_config_file("config", None, "An ml_collections config file (configs/*.py); override keys "
                                "with --config.section.key=value.", flag_values=FLAGS, lock_config=True)
flags.DEFINE_integer("stop_after_steps", None, "Stop (with a checkpoint) after this many steps of this "
                     "invocation, as a preemption would.", flag_values=FLAGS)
common.define_distributed(FLAGS)


def main(argv: list[str]) -> int:
  del argv
  workdir = common.workdir(FLAGS)
  common.require(FLAGS, "config")
  from ddx import limits  # pylint: disable=import-outside-toplevel
  stop_after = common.check_int(FLAGS, "stop_after_steps", lo=1, hi=limits.MAX_STEP)
  common.check_distributed(FLAGS)
  from ddx import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.validate(FLAGS.config)  # before any JAX work
  common.init_distributed(FLAGS)
  import ddx  # pylint: disable=import-outside-toplevel
  from ddx import data, loop  # pylint: disable=import-outside-toplevel
  from ddx.models import UNet, unet_kwargs  # pylint: disable=import-outside-toplevel

  d = cfg["data"]
  source = data.make_source(d["name"], split=d["split"], data_dir=d["data_dir"], image_size=d["image_size"] or None)
  if cfg["kind"] == "autoencoder":
    from ddx.commands import _train_latent as train_latent  # pylint: disable=import-outside-toplevel
    return train_latent.train_autoencoder(workdir, cfg, source, _loop_spec(cfg), stop_after)
  decode = None
  if cfg["latent"]["autoencoder_workdir"]:
    from ddx.commands import _train_latent as train_latent  # pylint: disable=import-outside-toplevel
    source, decode = train_latent.latent_source(workdir, cfg, source)
  h, _, c = source.image_shape
  cfg["model"] = m = unet_kwargs(**cfg["model"])
  if (m["image_size"], m["in_channels"]) != (h, c):
    raise ValueError(f"model.image_size: image_size/in_channels ({m['image_size']}, {m['in_channels']}) do not "
                     f"match the data ({h}, {c})")
  if m["num_classes"] and source.num_classes > m["num_classes"]:
    raise ValueError(f"model.num_classes: {m['num_classes']} < the data's {source.num_classes} classes")
  t = cfg["train"]
  spec = _loop_spec(cfg)
  s = cfg["sample"]
  sample = loop.SampleSpec(
      sampler=s["sampler"], steps=s["steps"], num=s["num"], guidance=s["guidance"],
      sampler_kwargs=config_lib.sampler_kwargs(cfg["diffusion"], sampler=s["sampler"], eta=s["eta"],
                                               clip_sample=s["clip_sample"]))
  evaluation = _eval_spec(cfg, source, workdir) if t["eval_every"] else None
  sched = ddx.schedules.make(**config_lib.schedule_kwargs(cfg["diffusion"]))
  summary = loop.run(
      workdir, cfg, model_factory=lambda rngs: UNet(**m, rngs=rngs),
      num_classes=m["num_classes"], use_dropout=m["dropout"] > 0, source=source, sched=sched,
      optim=config_lib.optimizer_spec(cfg), loss=config_lib.loss_spec(cfg), loop=spec, sample=sample,
      evaluation=evaluation, stop_after_steps=stop_after, decode=decode)
  print_summary(summary)
  return 0


def print_summary(summary: dict) -> None:
  summary.pop("state")
  if summary["preempted"]:
    print(f"stopped at step {summary['step']} after a preemption signal; rerun the same command to resume")
  print("summary: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}))


def _loop_spec(cfg: dict):
  from ddx import loop  # pylint: disable=import-outside-toplevel
  t, d = cfg["train"], cfg["data"]
  return loop.LoopSpec(
      seed=cfg["seed"], global_batch_size=t["global_batch_size"], total_steps=t["total_steps"],
      steps_per_call=t["steps_per_call"], random_flip=d["random_flip"], num_threads=d["num_threads"],
      ema_decay=t["ema_decay"], ema_warmup=t["ema_warmup"], label_dropout=t["label_dropout"],
      log_every_seconds=t["log_every_seconds"], checkpoint_every=t["checkpoint_every"],
      keep_checkpoints=t["keep_checkpoints"], keep_period=t["keep_period"], sample_every=t["sample_every"],
      eval_every=t["eval_every"], max_nonfinite=t["max_nonfinite"])


def _eval_spec(cfg: dict, source, workdir: str):
  """The loop's EvalSpec from the validated ``eval`` section: the feature network and the
  training data's reference statistics (cached under eval.cache_dir, default <workdir>/eval_cache)."""
  import os  # pylint: disable=import-outside-toplevel

  from ddx import config as config_lib  # pylint: disable=import-outside-toplevel
  from ddx import loop  # pylint: disable=import-outside-toplevel
  from ddx.eval import quality  # pylint: disable=import-outside-toplevel
  e, d = cfg["eval"], cfg["data"]
  try:
    net = quality.feature_net(e["features"], e["inception_weights"])
  except ValueError as err:
    raise ValueError(f"eval.{err}") from None
  cache_dir = os.path.abspath(e["cache_dir"]) if e["cache_dir"] else os.path.join(os.path.abspath(workdir), "eval_cache")
  ref = quality.reference_for_source(net, source, cache_dir=cache_dir, dataset=d["name"], split=d["split"],
                                     batch=e["batch"])
  kwargs = config_lib.sampler_kwargs(cfg["diffusion"], sampler=e["sampler"], eta=e["eta"],
                                     clip_sample=cfg["sample"]["clip_sample"])
  return loop.EvalSpec(net=net, reference=ref, sampler=e["sampler"], steps=e["steps"], sampler_kwargs=kwargs,
                       num=e["num"], batch=e["batch"])
