"""Real multi-process JAX over 127.0.0.1: the local launcher's 2 processes x 2 devices train
like one process with 8 (the run's shared tiny workdir); each host's input shards hold its
rows; processes that resume one workdir agree on the step, and one of them alone sets a bad
step aside; their sharded checkpoint resumes on another mesh and process count."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from ddx import parallel, storage
from ddx.training import checkpoint
from tests._tiny import ROOT, TRAIN_FLAGS, assert_params_close, loop_run, run_processes, saved, subprocess_env


def test_local_launcher_2x2_trains_like_one_process_with_8_devices(_trained_run, tmp_path, ddx_cli):
  """The 12 steps of the run's shared tiny workdir (one process, 8 devices, data parallel),
  trained again by 2 processes x 2 devices as data 2 x fsdp 2 with every U-Net leaf it can
  split sharded (convolutions, GroupNorm, dropout): the same parameters and EMA up to
  reduction order. One process then restores the sharded multi-host checkpoint and samples."""
  mh = str(tmp_path / "mh")
  argv = [
    *TRAIN_FLAGS,
    "--config.parallel.fsdp=2",
    "--config.parallel.fsdp_min_size=0",
    "--config.train.total_steps=12",
    "--config.train.sample_every=4",
    "--config.sample.num=8",
    "--config.sample.steps=2",
  ]
  p = subprocess.run(
    [
      "bash",
      "launch/local_multihost.sh",
      "2",
      "2",
      "--",
      sys.executable,
      "-m",
      "ddx",
      "train",
      f"--workdir={mh}",
      *argv,
    ],
    cwd=ROOT,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "2 processes" in p.stdout and "4 devices" in p.stdout, p.stdout[-2000:]
  assert "mesh {'data': 2, 'fsdp': 2}; state per device" in p.stdout, p.stdout[-2000:]
  # the sample grid, sharded over both processes, is gathered and written once by process 0
  assert os.path.exists(os.path.join(mh, "samples", "step_00000004.png"))
  assert np.load(os.path.join(mh, "samples", "step_00000004.npz"))["samples"].shape == (8, 8, 8, 1)
  (sa, a), (sb, b) = saved(mh), saved(_trained_run)
  assert sa == sb == 12
  assert_params_close(a["params"], b["params"])
  assert_params_close(a["ema_params"], b["ema_params"])
  # one process (8 devices) restores the multi-host checkpoint and samples from it
  code, out, err = ddx_cli("sample", f"--workdir={mh}", "--steps=2", "--num=8")
  assert code == 0 and "wrote" in out, err[-2000:]


_TWO_PROCESS_BATCHES = textwrap.dedent(
  """
    import sys
    import jax, numpy as np
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from ddx import data
    assert jax.process_count() == 2 and jax.device_count() == 8
    src = data.make_source("digits")
    ref = data.get_batch(src, 4, seed=1, global_batch_size=32, random_flip=True)
    devices = np.array(jax.devices())
    # In process order, and reversed (process 0 then holds rows 16..31).
    for devs, expect in ((devices, pid), (devices[::-1], 1 - pid)):
      mesh = jax.sharding.Mesh(devs, ("data",))
      pidx, pcount = data.process_slice(mesh, 32)
      assert (pidx, pcount) == (expect, 2), (pid, pidx, pcount)
      it = data.make_batches(src, seed=1, global_batch_size=32, start_step=4, process_index=pidx,
                             process_count=pcount, random_flip=True)
      local = next(it)
      assert local["image"].shape == (16, 8, 8, 1)
      g = data.to_global_array(local, mesh)
      assert g["image"].shape == (32, 8, 8, 1) and g["label"].shape == (32,)
      for key in ("image", "label"):
        assert len(g[key].addressable_shards) == 4
        for shard in g[key].addressable_shards:
          np.testing.assert_array_equal(np.asarray(shard.data), ref[key][shard.index[0]])
    print("TWO_PROCESS_OK", pid, flush=True)
    jax.distributed.shutdown()
    """
)


def test_each_process_reads_its_rows_of_the_global_batch():
  """2 processes x 4 fake devices: each host's shards hold its rows, whatever the device order."""
  for pid, (out, code) in enumerate(run_processes(_TWO_PROCESS_BATCHES, devices=4, timeout=180)):
    assert code == 0 and f"TWO_PROCESS_OK {pid}" in out, out[-3000:]


# Two JAX processes sharing one workdir on a bucket (the GCS emulator), on a data 2 x fsdp 4
# mesh (the state sharded across both processes): train to step 4, damage step 4 (process 0),
# resume; then a step that only process 1 fails to read. Every process verifies, they agree on
# the step to resume from, process 0 alone moves the bad step, all meet before reloading.
_TWO_PROCESS_RESUME = textwrap.dedent(
  """
    import os, sys
    import fsspec, jax
    pid, port, wd = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    from ddx import parallel
    from ddx.training import checkpoint
    from tests._tiny import loop_run

    def train(total, stop=None):
      return loop_run(wd, total, mesh=parallel.make_mesh(4), stop_after_steps=stop, fsdp_min_size=512)

    train(6, stop=4)
    multihost_utils.sync_global_devices("trained")
    if pid == 0:  # every data object of the item (after the processes' writes are merged, the root's are read)
      fs, item = fsspec.core.url_to_fs(os.path.join(wd, "checkpoints", "4", "params"))
      for f in [f for f in fs.find(item) if "/d/" in f]:
        data = bytearray(fs.cat_file(f))
        for i in range(len(data) // 2, len(data) // 2 + min(64, len(data) // 2)):
          data[i] ^= 0xFF
        fs.pipe_file(f, bytes(data))
    multihost_utils.sync_global_devices("damaged")
    print("DONE", pid, train(6)["step"], flush=True)
    # step 6 fails its checksums on process 1 alone (injected after the real read: the disk is
    # shared here, a host's own bad copy is not): it is bad for both
    real = checkpoint.Checkpointer.restore

    def restore(self, step, targets):
      items = real(self, step, targets)
      if pid == 1 and step == 6:
        raise checkpoint.CorruptCheckpointError(f"step {step}: injected mismatch on process 1", step)
      return items

    checkpoint.Checkpointer.restore = restore
    print("DONE", pid, train(8)["step"], flush=True)
    jax.distributed.shutdown()
    """
)


def test_two_processes_set_aside_a_bad_step_once_and_resume(tmp_path, gcs):
  """... and the sharded checkpoint they wrote resumes in one process on another mesh (data 2 x
  fsdp 2 of 4 devices) to the parameters of a run that trained on that mesh from the start.
  (The launcher test above has two processes write a local workdir.)"""
  wd = gcs.root(f"two-processes-{tmp_path.name}")
  outs = run_processes(_TWO_PROCESS_RESUME, wd, devices=4, timeout=300)
  for pid, (out, code) in enumerate(outs):
    assert code == 0 and f"DONE {pid} 6" in out and f"DONE {pid} 8" in out, out[-3000:]
  outs = [out for out, _ in outs]
  aside = os.path.join(wd, checkpoint.CORRUPT_SUBDIR)
  assert "checkpoint step 4 does not verify: corrupt" in outs[0], outs[0][-3000:]
  assert (
    f"resumed from {wd}/checkpoints/2, the newest checkpoint that verifies (step 4 failed verification; "
    f"moved to {aside}/4, not deleted)"
  ) in outs[0], outs[0][-3000:]
  # step 6 failed on process 1 only: both processes resumed from step 4
  assert "process 1: checkpoint step 6 does not verify: step 6: injected mismatch on process 1" in outs[1]
  assert "checkpoint step 6 does not verify on every process" in outs[0], outs[0][-3000:]
  assert (
    f"resumed from {wd}/checkpoints/4, the newest checkpoint that verifies (step 6 failed verification; "
    f"moved to {aside}/6, not deleted)"
  ) in outs[0], outs[0][-3000:]
  # moved once (not once per process), kept, and the steps written anew verify
  assert storage.listdir(aside) == ["4", "6"]
  assert checkpoint.all_steps(wd) == [6, 8]
  assert checkpoint.verify(wd, 6)[0] == checkpoint.verify(wd, 8)[0] == "ok"
  mesh = parallel.make_mesh(2, jax.devices()[:4])
  resumed = loop_run(wd, 10, mesh=mesh, fsdp_min_size=512)
  assert resumed["steps"] == 2
  straight = loop_run(str(tmp_path / "straight"), 10, mesh=mesh, fsdp_min_size=512)
  la, lb = (
    jax.tree_util.tree_leaves(jax.device_get((r["state"].params, r["state"].ema_params))) for r in (resumed, straight)
  )
  assert len(la) == len(lb) == 8
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
