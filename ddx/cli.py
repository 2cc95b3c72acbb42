"""Command line: ``python -m ddx <command> [--flags]`` (also the ``ddx`` console script).

Commands live in ``COMMANDS`` (name -> (function(argv) -> int | None, one-line help)); the
first positional argument picks one. To add a command, define its flags at module level
(reuse the shared ``--workdir`` flag below) and call ``register(name, fn, help)``.

Commands:
  convert  --diffusers=PATH --workdir=DIR [--overwrite]
           Import a diffusers UNet2DModel folder (config.json + safetensors; the scheduler's
           scheduler_config.json is read when present) into a ddx workdir: writes
           DIR/config.json and checkpoint step 0 with "params" and "ema_params".
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging

FLAGS = flags.FLAGS

# Shared flags (used by several commands).
flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
# convert
flags.DEFINE_string("diffusers", None, "convert: diffusers UNet2DModel folder (or a pipeline "
                    "folder with unet/ and scheduler/ subfolders).")
flags.DEFINE_bool("overwrite", False, "convert: allow writing into a workdir that already has "
                  "checkpoints.")

COMMANDS: dict[str, tuple[Callable[[list[str]], int | None], str]] = {}


def register(name: str, fn: Callable[[list[str]], int | None], help_text: str) -> None:
  """Add a subcommand; ``fn`` receives the remaining positional argv."""
  COMMANDS[name] = (fn, help_text)


def usage() -> str:
  lines = ["usage: python -m ddx <command> [--flags]", "commands:"]
  lines += [f"  {n:10s} {h}" for n, (_, h) in sorted(COMMANDS.items())]
  return "\n".join(lines)


def _require(*names: str) -> None:
  for n in names:
    if not getattr(FLAGS, n):
      raise app.UsageError(f"--{n} is required")


def cmd_convert(argv: list[str]) -> int:
  """python -m ddx convert --diffusers=PATH --workdir=DIR."""
  from ddx import checkpoint  # pylint: disable=import-outside-toplevel
  from ddx.models import convert  # pylint: disable=import-outside-toplevel

  if argv:
    raise app.UsageError(f"convert: unexpected arguments {argv}")
  _require("diffusers", "workdir")
  workdir = os.path.abspath(FLAGS.workdir)
  if checkpoint.all_steps(workdir) and not FLAGS.overwrite:
    raise app.UsageError(f"{workdir} already has checkpoints; pass --overwrite or a new --workdir")
  model = convert.from_diffusers(FLAGS.diffusers)
  diffusion = convert.diffusers_scheduler_to_diffusion(
      convert.load_scheduler_config(FLAGS.diffusers))
  config = {
      "model": model.kwargs,
      "diffusion": diffusion,
      "source": {"format": "diffusers", "path": os.path.abspath(FLAGS.diffusers)},
  }
  path = checkpoint.save(workdir, 0, {"params": model, "ema_params": model}, config)
  logging.info("converted %s -> %s", FLAGS.diffusers, path)
  print(f"wrote {os.path.join(workdir, checkpoint.CONFIG_NAME)} and {path}")
  return 0


register("convert", cmd_convert, "import a diffusers UNet2DModel into a ddx workdir")


def main(argv: list[str]) -> int | None:
  if not FLAGS["verbosity"].present:  # orbax logs every save step at INFO
    logging.set_verbosity(logging.WARNING)
  if len(argv) < 2:
    raise app.UsageError(f"missing command\n{usage()}")
  name, rest = argv[1], argv[2:]
  if name not in COMMANDS:
    raise app.UsageError(f"unknown command {name!r}\n{usage()}")
  try:
    return COMMANDS[name][0](rest)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"ddx {name}: error: {e}")


def _config_roots(argv: list[str]) -> None:
  """Let a config file import its siblings (``from configs import default``): put the
  directory above the config's folder on sys.path before absl parses --config."""
  for i, a in enumerate(argv):
    path = a.split("=", 1)[1] if a.startswith("--config=") else (argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (config overrides of unknown keys raise deep
  inside ml_collections otherwise)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"ddx: error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    hint = f" (in {', '.join(b.split('=')[0] for b in bad)})" if bad else ""
    sys.exit(f"ddx: error: invalid flag value or unknown config key {e}{hint}")


def run() -> None:
  """Console entry point (``ddx`` script / ``python -m ddx``)."""
  _config_roots(sys.argv)
  app.run(main, argv=sys.argv, flags_parser=_parse_flags)


# train / sample / info register themselves on import (kept in their own module).
from ddx import commands  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
