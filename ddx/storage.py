"""Where ddx reads and writes files: local paths, ``gs://`` (Google Cloud Storage) and
``s3://`` (Amazon S3 and S3-compatible stores), through `etils.epath`, the path type orbax
uses, so that a workdir or a file on a bucket behaves like a local one.

Conventions:
  - A path is passed around as a string: an absolute local path, or ``scheme://bucket/key``
    (`normalize`). ``os.path.join`` / ``dirname`` / ``basename`` work on both; the I/O goes
    through the functions here (or `path`), never ``open`` / ``os.makedirs`` directly.
  - Whole-file writes are atomic everywhere: locally a temporary file renamed into place, on
    an object store one upload (an object is replaced whole or not at all). Object stores
    have no append and no rename: `append_text` rewrites the object, `move_tree` copies
    then deletes (callers make a half-done move harmless, see `checkpoint.set_aside`).
  - Errors are one line naming the path: FileNotFoundError for a missing file, bucket or
    workdir; ValueError for an unusable path (an unknown scheme, a client library that is
    not installed, no credentials).

Object-store clients (extras): ``pip install 'ddx[gcs]'`` (gcsfs, google-cloud-storage) for
gs://, ``pip install 'ddx[s3]'`` (s3fs, boto3) for s3://. Their endpoints and credentials
come from the usual environment (docs/storage.md lists what each library reads).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
from typing import Iterator

import fsspec
from etils import epath

# scheme -> (the fsspec client module epath needs, the extra that installs it)
SCHEMES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}

# A workdir's listings change under a run (other processes and hosts write its checkpoints);
# the fsspec clients cache directory listings forever by default, so a listing could miss a
# step or show one that was moved away. Every listing asks the store.
for _protocol in ("gs", "gcs", "s3", "s3a"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def scheme(p: str | os.PathLike) -> str | None:
  """``"gs"`` / ``"s3"`` for an object-store path, None for a local one."""
  s = os.fspath(p)
  return s.split("://", 1)[0] if "://" in s else None


def is_remote(p: str | os.PathLike) -> bool:
  return scheme(p) is not None


def normalize(p: str | os.PathLike, what: str = "path") -> str:
  """The canonical string of a path: local paths absolute (``~`` expanded), object-store
  URLs checked (scheme known, bucket named, client installed) and without a trailing ``/``.

  Raises ValueError (one line starting with ``what``) for an unusable path.
  """
  s = os.fspath(p)
  if not isinstance(s, str) or not s.strip():
    raise ValueError(f"{what}: must be a path, got {p!r}")
  sch = scheme(s)
  if sch is None:
    return os.path.abspath(os.path.expanduser(s))
  if sch not in SCHEMES:
    raise ValueError(f"{what}: {s}: unsupported scheme {sch}:// (ddx reads and writes local paths, gs:// and s3://)")
  rest = s.split("://", 1)[1].rstrip("/")
  if rest.split("/", 1)[0] in ("", ".", ".."):
    raise ValueError(f"{what}: {s}: no bucket named (expected {sch}://BUCKET/PATH)")
  module, extra = SCHEMES[sch]
  if importlib.util.find_spec(module) is None:
    raise ValueError(f"{what}: {s}: {sch}:// paths need the {module} package: pip install 'ddx[{extra}]'")
  return f"{sch}://{rest}"


def path(p: str | os.PathLike, what: str = "path") -> epath.Path:
  """`normalize`'d, as an `epath.Path` (what orbax takes)."""
  return epath.Path(normalize(p, what))


def bucket(p: str) -> str:
  """``gs://bucket`` of an object-store path."""
  sch, rest = p.split("://", 1)
  return f"{sch}://{rest.split('/', 1)[0]}"


def check_reachable(p: str, what: str = "workdir") -> None:
  """For an object-store path: one line if its bucket does not exist or cannot be reached
  with the credentials at hand (checked at the entrypoint, before any work). Local: nothing."""
  if not is_remote(p):
    return
  root = bucket(p)
  try:
    fs, key = fsspec.core.url_to_fs(root)
    fs.ls(key, detail=False)  # (exists() would say False for an unreachable store too)
  except FileNotFoundError:
    raise FileNotFoundError(f"{what}: {p}: the bucket {root} does not exist (create it first)") from None
  except Exception as e:  # noqa: BLE001 -- fsspec clients raise many types; one line with the cause
    raise ValueError(f"{what}: {p}: {root} cannot be reached: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  low = text.lower()
  if any(k in low for k in ("credential", "unauthenticated", "401", "403", "access denied", "forbidden")):
    return f"no usable credentials ({text[:160]})"
  return text[:200]


# ---------------------------------------------------------------- queries


def exists(p: str) -> bool:
  return path(p).exists()


def isfile(p: str) -> bool:
  return path(p).is_file()


def isdir(p: str) -> bool:
  return path(p).is_dir()


def listdir(p: str) -> list[str]:
  """Names in a directory (sorted); [] if it does not exist."""
  d = path(p)
  if not d.exists():
    return []
  return sorted(c.name for c in d.iterdir())


# ---------------------------------------------------------------- reads and writes


def read_bytes(p: str) -> bytes:
  return path(p).read_bytes()


def read_text(p: str) -> str:
  return path(p).read_text()


def makedirs(p: str) -> None:
  """Create a local directory and its parents; nothing on object stores (no directories)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def write_bytes(p: str, data: bytes) -> str:
  """Write a whole file atomically (see the module docstring); returns ``p``."""
  p = normalize(p)
  if is_remote(p):
    path(p).write_bytes(data)
    return p
  os.makedirs(os.path.dirname(p), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(p) + ".", suffix=".tmp", dir=os.path.dirname(p))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return p


def write_text(p: str, text: str) -> str:
  return write_bytes(p, text.encode())


def append_text(p: str, text: str) -> None:
  """Append to a text file: a real append locally; on an object store the object is read and
  rewritten whole (one upload: readers see the old or the new object, never half of it)."""
  p = normalize(p)
  if is_remote(p):
    d = path(p)
    old = d.read_text() if d.exists() else ""
    d.write_text(old + text)
    return
  os.makedirs(os.path.dirname(p), exist_ok=True)
  with open(p, "a") as f:
    f.write(text)


def save_npz(p: str, compressed: bool = True, **arrays) -> str:
  """``np.savez[_compressed]`` to any path (atomically); returns ``p``."""
  import numpy as np  # noqa: PLC0415 -- numpy is always there; kept local to keep this module light

  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  return write_bytes(p, buf.getvalue())


def remove_tree(p: str) -> None:
  d = path(p)
  if d.exists():
    d.rmtree()


def move_tree(src: str, dst: str, first: tuple[str, ...] = ()) -> None:
  """Move a directory: ``os.replace`` locally. On an object store every object is copied,
  then the source deleted, the files named in ``first`` (relative to ``src``) before the
  rest: a move cut short leaves the source whole, or without those files."""
  if not is_remote(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
    return
  fs, key = fsspec.core.url_to_fs(src)
  _, dkey = fsspec.core.url_to_fs(dst)
  # (epath's glob refuses "**" on buckets; fsspec's find lists every object under a prefix)
  for f in sorted(fs.find(key)):
    fs.copy(f, dkey + f[len(key) :])
  for name in first:
    if fs.exists(f"{key}/{name}"):
      fs.rm_file(f"{key}/{name}")
  fs.rm(key, recursive=True)


@contextlib.contextmanager
def local_dir(p: str, what: str = "folder") -> Iterator[str]:
  """A local directory holding the tree under ``p`` (every object below the prefix, copied to
  a temporary directory that is removed afterwards), for readers of local folders only
  (safetensors' memory map, transformers' tokenizer); ``p`` itself when it is local."""
  p = normalize(p, what)
  if not is_remote(p):
    yield p
    return
  fs, key = fsspec.core.url_to_fs(p)
  names = fs.find(key)
  if not names:
    raise FileNotFoundError(f"{what}: folder not found: {p}")
  with tempfile.TemporaryDirectory(prefix="ddx-") as tmp:
    for name in names:
      local = os.path.join(tmp, os.path.relpath(name, key))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      fs.get_file(name, local)
    yield tmp


@contextlib.contextmanager
def local_copy(p: str) -> Iterator[str]:
  """A local file holding ``p``'s bytes, for libraries that only open local files
  (safetensors' memory map); ``p`` itself when it is local."""
  if not is_remote(p):
    yield p
    return
  with tempfile.TemporaryDirectory(prefix="ddx-") as tmp:
    local = os.path.join(tmp, os.path.basename(p))
    with open(local, "wb") as f:
      f.write(read_bytes(p))
    yield local
