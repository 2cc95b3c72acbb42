"""``python -m ddx <command>``: see `ddx.cli`."""

from ddx.cli import run

if __name__ == "__main__":
  run()
