"""Workdirs on object storage (`ddx.storage`): paths checked at the entrypoint, every file of
a run written to and read from a bucket, checksums and the set-aside of a damaged step on a
bucket, and the workdir lease. Against a Google Cloud Storage emulator on 127.0.0.1 (the
``gcs`` fixture, tests/_storage.py); the kill -9 resume on a bucket is in
tests/multiprocess/test_preemption.py, two processes writing one bucket in test_multihost.py."""

import io
import json
import os
import socket
import time

import fsspec
import numpy as np
import pytest
from PIL import Image

from ddx import storage
from ddx.training import checkpoint, workdir_lock
from tests._tiny import loop_run

# --- paths at the entrypoint (no store needed) ------------------------------------------------


@pytest.mark.parametrize(
  "workdir, message",
  [
    (
      "az://box/run",
      "--workdir: az://box/run: unsupported scheme az:// (ddx reads and writes local paths, gs:// and s3://)",
    ),
    ("gs://", "--workdir: gs://: no bucket named (expected gs://BUCKET/PATH)"),
    ("s3:///run", "--workdir: s3:///run: no bucket named (expected s3://BUCKET/PATH)"),
  ],
)
def test_bad_paths_are_one_line(ddx_cli, workdir, message):
  code, out, err = ddx_cli("verify", f"--workdir={workdir}")
  assert code == 1 and out == "" and err == f"ddx verify: error: {message}\n", err


def test_a_scheme_without_its_client_names_the_extra(ddx_cli, monkeypatch):
  monkeypatch.setitem(storage.SCHEMES, "gs", ("no_such_client_module", "gcs"))
  code, _, err = ddx_cli("sample", "--workdir=gs://bucket/run")
  assert code == 1
  assert err == (
    "ddx sample: error: --workdir: gs://bucket/run: gs:// paths need the no_such_client_module package: "
    "pip install 'ddx[gcs]'\n"
  )


def test_s3_workdirs_are_refused_before_any_work(ddx_cli, monkeypatch):
  monkeypatch.setitem(storage.SCHEMES, "s3", ("json", "s3"))  # (whether or not s3fs is installed)
  code, _, err = ddx_cli("sample", "--workdir=s3://bucket/run")
  assert code == 1
  assert err == (
    "ddx sample: error: --workdir: s3://bucket/run: checkpoints cannot be written to s3:// yet (orbax writes "
    "arrays to local paths and gs:// only); use a gs:// bucket or a shared filesystem\n"
  )


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.normalize("run") == str(tmp_path / "run")
  assert storage.normalize("gs://b/x/") == "gs://b/x"
  assert not storage.is_remote(str(tmp_path)) and storage.is_remote("s3://b/x")


# --- on the emulator --------------------------------------------------------------------------


def test_files_on_a_bucket(gcs):
  root = gcs.root("files")
  p = storage.write_text(f"{root}/a/b.txt", "one\n")
  storage.append_text(p, "two\n")
  assert storage.read_text(p) == "one\ntwo\n"
  npz = storage.save_npz(f"{root}/x.npz", x=np.arange(3))
  np.testing.assert_array_equal(np.load(io.BytesIO(storage.read_bytes(npz)))["x"], np.arange(3))
  assert storage.listdir(root) == ["a", "x.npz"] and storage.isdir(f"{root}/a") and storage.isfile(p)
  storage.write_text(f"{root}/a/c/marker", "m")
  storage.move_tree(f"{root}/a", f"{root}/moved/a", first=("c/marker",))
  assert not storage.exists(f"{root}/a") and storage.read_text(f"{root}/moved/a/c/marker") == "m"
  assert storage.listdir(f"{root}/moved/a") == ["b.txt", "c"]


def test_a_missing_bucket_is_one_line(gcs, ddx_cli):
  code, _, err = ddx_cli("verify", "--workdir=gs://no-such-bucket/run")
  assert code == 1
  assert err == (
    "ddx verify: error: --workdir: gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist "
    "(create it first)\n"
  ), err


def _objects(prefix):
  fs, key = fsspec.core.url_to_fs(prefix)
  return {f[len(key) + 1 :]: fs.cat_file(f) for f in fs.find(key)}


def _damage(workdir, step, item):
  """Flip one bit in 8 bytes of the item's largest array object so that it still decodes to
  other, finite values; returns the object's key."""
  fs, key = fsspec.core.url_to_fs(f"{workdir}/checkpoints/{step}/{item}/ocdbt.process_0/d")
  name = max(fs.find(key), key=lambda f: fs.info(f)["size"])
  pristine = fs.cat_file(name)
  for at in (0.5, 0.6, 0.4, 0.7, 0.3, 0.8):
    data = bytearray(pristine)
    start = int(len(data) * at)
    for i in range(start, start + 8):
      data[i] ^= 0x01
    fs.pipe_file(name, bytes(data))
    if checkpoint.verify(workdir, step)[0] == "bad":
      return name
  fs.pipe_file(name, pristine)
  raise AssertionError("no damage found that decodes")


def test_train_sample_verify_and_set_aside_on_a_bucket(gcs, tmp_path, ddx_cli, capsys):
  """The training loop on a bucket workdir: every file of the run lands there; a damaged step
  is refused by sample and verify with one line, and the next run sets it aside on the
  bucket and retrains it bitwise; the run equals the same run on a local disk."""
  wd, local = gcs.root("loop"), str(tmp_path / "local")
  loop_run(local, 6)
  loop_run(wd, 6, stop_after_steps=4)
  assert checkpoint.all_steps(wd) == [2, 4]
  objects = _objects(wd)
  assert "config.json" in objects and "metrics.jsonl" in objects and "train.lock" not in objects
  assert any(k.startswith("events.out.tfevents.") for k in objects)
  assert "checkpoints/4/commit_success.txt" in objects  # orbax's commit on a store without rename
  rows = [json.loads(l) for l in storage.read_text(f"{wd}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == sorted({r["step"] for r in rows if "loss" in r})

  damaged = _damage(wd, 4, "params")
  status, detail = checkpoint.verify(wd, 4)
  assert status == "bad" and detail.startswith(f"corrupt checkpoint {wd}/checkpoints/4: step 4: params/"), detail
  code, out, err = ddx_cli("verify", f"--workdir={wd}")
  assert code == 1 and "step 4: BAD: corrupt checkpoint" in out and "1 ok, 1 bad" in out, out

  before = _objects(f"{wd}/checkpoints/4")
  capsys.readouterr()
  loop_run(wd, 6)
  out = capsys.readouterr().out
  aside = f"{wd}/{checkpoint.CORRUPT_SUBDIR}/4"
  assert f"moved to {aside}, not deleted" in out, out
  assert _objects(aside) == before and damaged.endswith(tuple(k for k in before if k.startswith("params/")))
  assert checkpoint.all_steps(wd) == [4, 6]
  for step in (4, 6):
    a, b = (checkpoint.restore(w, step, {"params": None, "opt_state": None})[1] for w in (wd, local))
    for name in a:
      for x, y in zip(*(list(np.asarray(v) for v in _leaves(t)) for t in (a[name], b[name]))):
        np.testing.assert_array_equal(x, y)
  code, out, _ = ddx_cli("verify", f"--workdir={wd}")
  assert code == 0 and "2 ok, 0 bad" in out and f"{aside}: set aside by train" in out, out

  # a save cut short (no commit marker): not a step; the next run clears it and writes it anew
  fs, key = fsspec.core.url_to_fs(f"{wd}/checkpoints/6")
  fs.rm_file(f"{key}/{checkpoint._COMMIT_MARKER}")
  assert checkpoint.all_steps(wd) == [4]
  loop_run(wd, 6)
  assert checkpoint.all_steps(wd) == [4, 6] and checkpoint.verify(wd, 6)[0] == "ok"
  a, b = (checkpoint.restore(w, 6, {"params": None})[1]["params"] for w in (wd, local))
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leaves(tree):
  import jax  # noqa: PLC0415

  return jax.tree_util.tree_leaves(tree)


def test_sample_grid_and_cli_outputs_on_a_bucket(gcs, tmp_path):
  """Images written to and read from a bucket: a sample grid and an input PNG."""
  from ddx import images  # noqa: PLC0415

  x = np.linspace(-1, 1, 2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  png, npz = images.save_samples(gcs.root("img/s"), x, labels=np.array([1, 2]))
  assert (png, npz) == (gcs.root("img/s.png"), gcs.root("img/s.npz"))
  grid = np.asarray(Image.open(io.BytesIO(storage.read_bytes(png))))
  assert grid.dtype == np.uint8 and grid.shape == (6, 11)
  single = gcs.root("img/one.png")
  images.save_png(single, images.to_uint8(x[0]))
  np.testing.assert_allclose(images.load_png(single, 4, 1), x[0], atol=1 / 127.5)
  with pytest.raises(ValueError, match=r"^--input: no such file 'gs://ddx-test/img/none.png'$"):
    images.load_png(gcs.root("img/none.png"), 4, 1)


# --- the workdir lease ------------------------------------------------------------------------


def test_the_lease_refuses_a_second_trainer_and_takes_over_a_dead_one(gcs, monkeypatch):
  monkeypatch.setenv(workdir_lock.LEASE_ENV, "2")
  wd = gcs.root("leased")
  first = workdir_lock.WorkdirLock(wd)
  assert isinstance(first, workdir_lock.LeaseLock)
  first.acquire()
  try:
    time.sleep(3)  # longer than the lease: only its renewals (every 0.5 s) keep it
    second = workdir_lock.WorkdirLock(wd)
    with pytest.raises(workdir_lock.WorkdirBusy) as e:
      second.acquire()
    msg = str(e.value)
    assert msg.startswith(f"workdir {wd}: another training run is using it (pid {os.getpid()} on host ")
    assert "lease renewed" in msg and "\n" not in msg
  finally:
    first.release()
  assert not storage.exists(f"{wd}/{workdir_lock.LOCK_NAME}")

  # a lease left by a process of this host that is gone (kill -9): taken over at once
  fs, key = fsspec.core.url_to_fs(f"{wd}/{workdir_lock.LOCK_NAME}")
  gone = {"holder": "pid 999999 on host here", "pid": 999999, "host": socket.gethostname(), "token": "x"}
  fs.pipe_file(key, json.dumps(gone).encode())
  third = workdir_lock.WorkdirLock(wd)
  third.acquire()
  third.release()
  # a lease of another host is taken over only once it is older than the lease time
  other = dict(gone, host="elsewhere", holder="pid 1 on host elsewhere")
  fs.pipe_file(key, json.dumps(other).encode())
  with pytest.raises(workdir_lock.WorkdirBusy, match="pid 1 on host elsewhere"):
    workdir_lock.WorkdirLock(wd).acquire()
  time.sleep(2.5)
  fourth = workdir_lock.WorkdirLock(wd)
  fourth.acquire()
  assert json.loads(fs.cat_file(key))["pid"] == os.getpid()
  # taken over under a live holder (its host's clock far behind, say): the holder notices at
  # its next renewal (the loop then stops before its next checkpoint) and leaves the new lease
  fs.pipe_file(key, json.dumps(other).encode())
  time.sleep(1.2)
  assert fourth.lost == "pid 1 on host elsewhere"
  fourth.release()
  assert json.loads(fs.cat_file(key))["host"] == "elsewhere"


def test_lease_time_is_checked(monkeypatch, gcs):
  monkeypatch.setenv(workdir_lock.LEASE_ENV, "soon")
  with pytest.raises(ValueError, match=r"^DDX_LOCK_LEASE_SECONDS: must be a number of seconds > 0, got 'soon'$"):
    workdir_lock.WorkdirLock(gcs.root("x"))
