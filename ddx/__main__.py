"""``python -m ddx <command>``: see `ddx.cli.main`."""

from ddx.cli.main import run

if __name__ == "__main__":
  run()
