"""Run metrics: ``<workdir>/metrics.jsonl`` and TensorBoard event files (via tensorboardX, no
TensorFlow). Only process 0 writes; other processes get a writer that does nothing."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class RunLogError(ValueError):
  """metrics.jsonl or the TensorBoard events could not be written (a full disk, say)."""


def _abandon(tb) -> None:
  """Stop a tensorboardX writer whose flush failed without writing again: its close() flushes
  first (and would fail again, here and in the atexit hook tensorboardX registers), so its
  worker thread is stopped and its writers marked closed directly."""
  for w in getattr(tb, "all_writers", {}).values():
    ev = w.event_writer
    try:
      if ev._worker is not None:
        ev._worker.stop()
      ev._ev_writer.close()
    except (OSError, ValueError):
      pass
    ev._closed = True


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        # tensorboardX imports torch when it is installed (over a second): only a writer pays it
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        self._tb = SummaryWriter(logdir=workdir, flush_secs=10)

  def truncate_after(self, step: int) -> None:
    """On resume: drop lines logged after ``step`` by a run that did not checkpoint them."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(keep)

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise RunLogError(f"{self.path}: cannot be written ({e.strerror or e})") from None
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), int(step))

  def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, np.asarray(grid_uint8), int(step), dataformats="HWC")

  def close(self) -> None:
    tb, self._tb = self._tb, None
    if tb is None:
      return
    try:
      tb.close()
    except OSError as e:
      _abandon(tb)
      raise RunLogError(
        f"the TensorBoard events in {os.path.dirname(self.path)}: cannot be written ({e.strerror or e})"
      ) from None
