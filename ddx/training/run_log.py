"""Run metrics: ``<workdir>/metrics.jsonl`` and TensorBoard event files (via tensorboardX, no
TensorFlow). Only process 0 writes; other processes get a writer that does nothing.

On an object store (``gs://``, ``s3://``) metrics.jsonl is rewritten whole at every call (no
append there; a row costs one upload of the file), and the TensorBoard events are written to
a local temporary directory and uploaded to the workdir every `TB_UPLOAD_SECONDS` and at
close (tensorboardX's own bucket writers upload again from ``__del__``, at interpreter exit)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from ddx import storage


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


TB_UPLOAD_SECONDS = 30.0


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir = storage.normalize(workdir, "workdir")
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._tb_local: str | None = None  # the events' local directory for an object-store workdir
    self._uploaded = {}  # local event file -> size last uploaded
    self._upload_at = 0.0
    if self.enabled:
      storage.makedirs(workdir)
      if tensorboard:
        # tensorboardX imports torch when it is installed (over a second): only a writer pays it
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        logdir = workdir
        if storage.is_remote(workdir):
          logdir = self._tb_local = tempfile.mkdtemp(prefix="ddx-events-")
          self._upload_at = time.monotonic() + TB_UPLOAD_SECONDS
        self._tb = SummaryWriter(logdir=logdir, flush_secs=10)

  def _upload_events(self, force: bool = False) -> None:
    if self._tb_local is None or not (force or time.monotonic() >= self._upload_at):
      return
    self._upload_at = time.monotonic() + TB_UPLOAD_SECONDS
    if not force:
      self._tb.flush()
    for name in sorted(os.listdir(self._tb_local)):
      local = os.path.join(self._tb_local, name)
      size = os.path.getsize(local)
      if os.path.isfile(local) and self._uploaded.get(name) != size:
        with open(local, "rb") as f:
          storage.write_bytes(os.path.join(self.workdir, name), f.read())
        self._uploaded[name] = size

  def truncate_after(self, step: int) -> None:
    """On resume: drop lines logged after ``step`` by a run that did not checkpoint them."""
    if not self.enabled or not storage.exists(self.path):
      return
    lines = storage.read_text(self.path).splitlines(keepends=True)
    keep = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
    storage.write_text(self.path, "".join(keep))

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    try:
      storage.append_text(self.path, json.dumps(row) + "\n")
    except OSError as e:
      raise RunLogError(f"{self.path}: cannot be written ({e.strerror or e})") from None
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._upload_events()

  def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, np.asarray(grid_uint8), int(step), dataformats="HWC")
      self._upload_events()

  def close(self) -> None:
    tb, self._tb = self._tb, None
    if tb is None:
      return
    try:
      tb.close()
      self._upload_events(force=True)
    except OSError as e:
      _abandon(tb)
      raise RunLogError(
        f"the TensorBoard events in {os.path.dirname(self.path)}: cannot be written ({e.strerror or e})"
      ) from None
    finally:
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)
