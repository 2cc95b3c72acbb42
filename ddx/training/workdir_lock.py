"""One training run per workdir: an exclusive lock that a second trainer finds taken.

Two runs writing one workdir would interleave checkpoints, overwrite each other's
``config.json`` and metrics, and garbage-collect each other's steps. Process 0 of a run holds
an advisory ``flock`` on ``<workdir>/train.lock`` for the run's lifetime; the kernel drops it
when the process ends in any way (kill -9 included), so a lock is never stale. The file
records who holds it (pid, host, start time) for the refusal's message. Works on local disks
and NFS (Linux implements ``flock`` there with POSIX locks).

An object store (a ``gs://`` or ``s3://`` workdir) has no locks: there the lock is a lease, the
object ``<workdir>/train.lock`` created only if absent (a conditional write, atomic on both
stores) and renewed by a background thread every quarter of ``DDX_LOCK_LEASE_SECONDS``
(default 120). A second trainer refuses while the lease is fresh; it takes over a lease that
was not renewed for that long (its holder died with its host), or one whose holder was a
process on the same host that no longer exists (a run killed and rerun on one machine goes
on at once). Freshness is judged by the store's modification time against the local clock:
hosts must keep their clocks to within a small part of the lease (NTP does).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid

import fsspec

from ddx import storage

LOCK_NAME = "train.lock"
LEASE_ENV = "DDX_LOCK_LEASE_SECONDS"


class WorkdirBusy(ValueError):
  """Another training run holds the workdir."""


def _busy(workdir: str, holder: str, extra: str = "") -> WorkdirBusy:
  return WorkdirBusy(
    f"workdir {workdir}: another training run is using it ({holder}){extra}; wait for it to end "
    "or train in another workdir"
  )


def _holder() -> str:
  started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  return f"pid {os.getpid()} on host {socket.gethostname()}, since {started}"


def WorkdirLock(workdir: str | os.PathLike):  # noqa: N802 -- a factory used like a class
  """The lock for ``workdir``: a `FileLock` on a local disk, a `LeaseLock` on an object store.
  Both have ``acquire()`` (or `WorkdirBusy`) and ``release()``."""
  workdir = storage.normalize(workdir, "workdir")
  return LeaseLock(workdir) if storage.is_remote(workdir) else FileLock(workdir)


class FileLock:
  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
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
      raise _busy(os.path.dirname(self.path), holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{_holder()}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def lease_seconds() -> float:
  raw = os.environ.get(LEASE_ENV, "120")
  try:
    value = float(raw)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ValueError(f"{LEASE_ENV}: must be a number of seconds > 0, got {raw!r}")
  return value


def _process_gone(record: dict) -> bool:
  """Whether the record's holder was a process on this host that no longer exists."""
  if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
    return False
  try:
    os.kill(record["pid"], 0)
  except ProcessLookupError:
    return True
  except OSError:  # exists, owned by someone else
    return False
  return False


class LeaseLock:
  """The lock of an object-store workdir (module docstring): a lease object created only if
  absent and renewed in the background."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.lease = lease_seconds()
    self._fs, self._key = fsspec.core.url_to_fs(self.path)
    self._record = {"holder": _holder(), "pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.lost: str | None = None  # set if another run took the lease over

  def _read(self) -> tuple[dict | None, float | None]:
    """The lease object's record and its age in seconds (None, None if there is none)."""
    try:
      info = self._fs.info(self._key, refresh=True)
      data = self._fs.cat_file(self._key)
    except FileNotFoundError:
      return None, None
    try:
      record = json.loads(data)
    except ValueError:
      record = {"holder": "an unreadable lease"}
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if isinstance(mtime, str):
      mtime = datetime.datetime.fromisoformat(mtime.replace("Z", "+00:00"))
    age = time.time() - mtime.timestamp() if isinstance(mtime, datetime.datetime) else None
    return record, age

  def _create(self) -> bool:
    """Create the lease object if absent; False if it exists."""
    try:
      self._fs.pipe_file(self._key, json.dumps(self._record).encode(), mode="create")
    except FileExistsError:
      return False
    except Exception as e:  # noqa: BLE001 -- the clients report a failed precondition in several ways
      if "precondition" in str(e).lower() or "412" in str(e):
        return False
      raise
    return True

  def acquire(self) -> None:
    """Take the lease or raise `WorkdirBusy` naming the holder and the lease's age."""
    for _ in range(3):
      if self._create():
        self._start()
        return
      record, age = self._read()
      if record is None:
        continue  # released between our two calls: try again
      stale = age is not None and age > self.lease
      if not (stale or _process_gone(record)):
        renewed = f", lease renewed {age:.0f} s ago" if age is not None else ""
        raise _busy(self.workdir, str(record.get("holder", "unknown")), renewed)
      try:
        self._fs.rm_file(self._key)
      except FileNotFoundError:
        pass
    raise _busy(self.workdir, "several runs starting at once")

  def _start(self) -> None:
    self._thread = threading.Thread(target=self._renew_loop, name="ddx-workdir-lease", daemon=True)
    self._thread.start()

  def _renew_loop(self) -> None:
    while not self._stop.wait(self.lease / 4):
      try:
        record, _ = self._read()
        if record is None or record.get("token") != self._record["token"]:
          self.lost = str((record or {}).get("holder", "the lease was deleted"))
          return
        self._fs.pipe_file(self._key, json.dumps(self._record).encode())
      except Exception:  # noqa: BLE001,S112 -- a failed renewal is retried at the next tick
        continue

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    if self.lost is None:
      try:
        record, _ = self._read()
        if record is not None and record.get("token") == self._record["token"]:
          self._fs.rm_file(self._key)
      except Exception:  # noqa: BLE001 -- a lease left behind goes stale and is taken over
        pass
