"""Command line: ``python -m ddx <command> [--flags]`` (also the ``ddx`` console script).

This module only dispatches. Each command is a module of `ddx.cli.commands` with a one-line
``HELP``, its own ``FLAGS`` (an ``absl.flags.FlagValues``: flags belong to one command, and a
flag the command does not define is an error) and ``main(argv) -> int`` (called after its
flags are parsed; ``argv`` holds the positional arguments, which no command takes today). Adding a command is
one module plus one line in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
import sys
import warnings

from absl import flags, logging

from ddx.cli import runtime

COMMANDS = {
  "train": "ddx.cli.commands.train",
  "sample": "ddx.cli.commands.sample",
  "info": "ddx.cli.commands.info",
  "convert": "ddx.cli.commands.convert",
  "invert": "ddx.cli.commands.invert",
  "interpolate": "ddx.cli.commands.interpolate",
  "edit": "ddx.cli.commands.edit",
  "inpaint": "ddx.cli.commands.inpaint",
  "eval": "ddx.cli.commands.eval",
  "txt2img": "ddx.cli.commands.txt2img",
  "verify": "ddx.cli.commands.verify",
}


class UsageError(ValueError):
  """A command line that cannot be run (exit status 2)."""


def usage() -> str:
  lines = ["usage: python -m ddx <command> [--flags]   (python -m ddx <command> --help: its flags)", "commands:"]
  for name, path in COMMANDS.items():
    lines.append(f"  {name:12s} {importlib.import_module(path).HELP}")
  return "\n".join(lines)


def _config_roots(argv: list[str]) -> None:
  """Let a config file import its siblings (``from configs import default``): put the
  directory above the config's folder on sys.path before --config is parsed."""
  for i, a in enumerate(argv):
    path = (
      a.split("=", 1)[1]
      if a.startswith("--config=")
      else (argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
    )
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
      if root not in sys.path:
        sys.path.insert(0, root)


def parse(name: str, argv: list[str]):
  """Import command ``name`` and parse ``argv`` (its flags only) into its FlagValues."""
  if name not in COMMANDS:
    raise UsageError(f"unknown command {name!r}\n{usage()}")
  module = importlib.import_module(COMMANDS[name])
  fv = module.FLAGS
  fv.unparse_flags()
  for flag in [f for f in fv if f.startswith("config.")]:
    delattr(fv, flag)  # ml_collections defines one flag per override at parse time: parse can run again
  _config_roots(argv)
  if "--help" in argv or "-h" in argv or "--helpfull" in argv:
    print(f"python -m ddx {name}: {module.HELP}\n\nflags:\n{fv.get_help()}")
    raise SystemExit(0)
  # ml_collections finds the --config.* overrides in sys.argv, not in the list it is given:
  # parse exactly ``argv``, whoever calls (the console entry point, or execute() in-process)
  saved_argv, sys.argv = sys.argv, ["ddx", name, *argv]
  try:
    rest = fv([f"ddx {name}"] + list(argv))
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an override of an unknown config key or a bad value
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    hint = f" (in {', '.join(bad)})" if bad else ""
    raise UsageError(f"invalid flag value or unknown config key {e}{hint}") from None
  finally:
    sys.argv = saved_argv
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {rest[1:]}")
  return module, rest[1:]


def main(argv: list[str]) -> int:
  """Run ``argv = ["ddx", command, *flags]``; errors propagate (`run` turns them into one line)."""
  if len(argv) < 2 or argv[1].startswith("-"):
    if len(argv) >= 2 and argv[1] in ("--help", "-h"):
      print(usage())
      return 0
    raise UsageError(f"missing command\n{usage()}")
  module, positional = parse(argv[1], argv[2:])
  return int(module.main(positional) or 0)


class _OneLineWarnings(py_logging.Handler):
  """ddx's own warnings (logger ``ddx``, e.g. a checkpoint without checksums) as
  ``<prog>: warning: <message>`` on the current ``sys.stderr``; ``prog`` is the command
  being run."""

  prog = "ddx"

  def emit(self, record):
    sys.stderr.write(f"{self.prog}: warning: {record.getMessage()}\n")


_WARNINGS = _OneLineWarnings()


def _one_line_warnings(prog: str) -> None:
  """Route logger ``ddx`` to stderr as one line per warning (installed once per process; the
  prefix follows the command being run)."""
  _WARNINGS.prog = prog
  logger = py_logging.getLogger("ddx")
  if _WARNINGS not in logger.handlers:
    logger.addHandler(_WARNINGS)
  logger.propagate = False


class _OrbaxBackgroundErrors(py_logging.Filter):
  """Drops orbax's error records about a failed background read or write (with their
  tracebacks), and asyncio's "exception was never retrieved" for the futures orbax left
  behind: the same error reaches ddx in the main thread, which reports it as one line
  (`ddx.training.checkpoint.CheckpointWriteError`, `CorruptCheckpointError`)."""

  def filter(self, record):
    if record.levelno < py_logging.ERROR:
      return True
    if record.name == "asyncio":  # ddx runs no event loop of its own: these are orbax's futures
      return "exception was never retrieved" not in record.getMessage()
    if "orbax" not in record.pathname:
      return True
    message = record.getMessage()
    return not (record.exc_info or "raised an exception" in message or "failed" in message.lower())


_ORBAX_FILTER = _OrbaxBackgroundErrors()


def _unraisable(hook):
  """sys.unraisablehook without "Event loop is closed": tensorstore's completion callbacks for
  an orbax operation that already failed land on the event loop orbax closed (one traceback
  each, after ddx has reported the failure)."""

  def quiet(u):
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return
    hook(u)

  quiet.ddx = True
  return quiet


def _quiet_background_errors() -> None:
  for name in ("absl", "asyncio"):
    logger = py_logging.getLogger(name)
    if _ORBAX_FILTER not in logger.filters:
      logger.addFilter(_ORBAX_FILTER)
  if not getattr(sys.unraisablehook, "ddx", False):
    sys.unraisablehook = _unraisable(sys.unraisablehook)
  # and the coroutines of such an operation that never ran, reported at exit
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def execute(argv: list[str]) -> int:
  """Run ``argv = ["ddx", command, *flags]`` and return the exit status, every error as one
  line on stderr (``<prog>: error: ...``): 2 for a command line that cannot be run, 1 for bad
  input or a failure the command reports. What `run` does after process setup, and what the
  tests call in-process."""
  prog = f"ddx {argv[1]}" if len(argv) > 1 and argv[1] in COMMANDS else "ddx"
  _one_line_warnings(prog)
  _quiet_background_errors()
  try:
    return main(argv)
  except UsageError as e:
    sys.stderr.write(f"{prog}: error: {e}\n")
    return 2
  except (ValueError, FileNotFoundError) as e:
    sys.stderr.write(f"{prog}: error: {e}\n")
    return 1
  except ImportError as e:  # an optional extra (torch, transformers) that this command needs
    sys.stderr.write(f"{prog}: error: {e} (pip install 'ddx[torch]' installs the optional extras)\n")
    return 1


def run() -> None:
  """Console entry point (``ddx`` script / ``python -m ddx``): one line per error."""
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  runtime.setup()  # XLA:CPU flags and the compilation cache, before any JAX backend starts
  sys.exit(execute(sys.argv))
