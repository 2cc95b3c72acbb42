"""One training run per workdir: an exclusive lock that a second trainer finds taken.

Two runs writing one workdir would interleave checkpoints, overwrite each other's
``config.json`` and metrics, and garbage-collect each other's steps. Process 0 of a run holds
an advisory ``flock`` on ``<workdir>/train.lock`` for the run's lifetime; the kernel drops it
when the process ends in any way (kill -9 included), so a lock is never stale. The file
records who holds it (pid, host, start time) for the refusal's message. Works on local disks
and NFS (Linux implements ``flock`` there with POSIX locks).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket

LOCK_NAME = "train.lock"


class WorkdirBusy(ValueError):
  """Another training run holds the workdir."""


class WorkdirLock:
  def __init__(self, workdir: str | os.PathLike):
    self.path = os.path.join(os.path.abspath(os.fspath(workdir)), LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Take the lock or raise `WorkdirBusy` (one line naming the holder)."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirBusy(
        f"workdir {os.path.dirname(self.path)}: another training run is using it ({holder}); wait for it to end "
        "or train in another workdir"
      ) from None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
