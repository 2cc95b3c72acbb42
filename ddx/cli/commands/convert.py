"""``python -m ddx convert --diffusers=PATH --workdir=DIR [--overwrite]``.

Imports a diffusers UNet2DModel folder (config.json + safetensors; the scheduler's
scheduler_config.json is read when present) into a ddx workdir: writes DIR/config.json and
checkpoint step 0 with "params" and "ema_params", which `sample` then reads.
"""

from __future__ import annotations

import os

from absl import flags

from ddx import storage
from ddx.cli.commands import common
from ddx.models.io import diffusers as convert
from ddx.training import checkpoint

HELP = "import a diffusers UNet2DModel into a ddx workdir: --diffusers=PATH --workdir=DIR"
FLAGS = flags.FlagValues()
common.define_workdir(FLAGS, "The ddx workdir to write.")
flags.DEFINE_string(
  "diffusers",
  None,
  "A diffusers UNet2DModel folder (or a pipeline folder with unet/ and scheduler/ subfolders).",
  flag_values=FLAGS,
)
flags.DEFINE_bool("overwrite", False, "Allow writing into a workdir that already has checkpoints.", flag_values=FLAGS)


def main(argv: list[str]) -> int:
  del argv
  common.require(FLAGS, "diffusers")
  workdir = common.workdir(FLAGS)

  if checkpoint.all_steps(workdir) and not FLAGS.overwrite:
    raise ValueError(f"--workdir: {workdir} already has checkpoints; pass --overwrite or a new --workdir")
  source = storage.normalize(FLAGS.diffusers, "--diffusers")
  with storage.local_dir(source, "--diffusers") as folder:  # a bucket folder is copied locally first
    model = convert.from_diffusers(folder)
    diffusion = convert.diffusers_scheduler_to_diffusion(convert.load_scheduler_config(folder))
  config = {
    "model": model.config.to_json(),
    "diffusion": diffusion,
    "source": {"format": "diffusers", "path": source},
  }
  path = checkpoint.save(workdir, 0, {"params": model, "ema_params": model}, config)
  print(f"wrote {os.path.join(workdir, checkpoint.CONFIG_NAME)} and {path}")
  return 0
