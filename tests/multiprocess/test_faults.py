"""Faults of a run at scale, each injected for real and survived with nothing lost: one of
two processes killed (the other stops by itself with one line), SIGTERM while a checkpoint is
being written, the disk filling during a save. (A second trainer on one workdir:
tests/integration/test_train.py; kill -9 and resume: test_preemption.py.)"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

from ddx.training import checkpoint
from tests._tiny import ROOT, assert_bitwise_equal, free_port, loop_run, saved, subprocess_env

# Two JAX processes training PixelModel until stopped (a real multi-process run, small enough
# to compile in a moment).
_TRAIN = textwrap.dedent(
  """
    import sys
    import jax
    pid, port, wd, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from ddx import parallel
    from tests._tiny import loop_run
    s = loop_run(wd, 10**6, mesh=parallel.data_mesh(), stop_after_steps=None if stop == "none" else int(stop))
    print("DONE", s["step"], flush=True)
    """
)


def _start_processes(workdir, stop="none"):
  port = str(free_port())
  env = subprocess_env(1, DDX_PEER_TIMEOUT_SECONDS="10")
  procs = []
  for pid in range(2):
    log = open(f"{workdir}.p{pid}.log", "w")
    cmd = [sys.executable, "-c", _TRAIN, str(pid), port, workdir, stop]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
  return procs


def test_a_killed_process_stops_the_others_with_one_line_and_the_rerun_resumes(tmp_path):
  """Process 1 of 2 killed with SIGKILL mid-run: process 0, left waiting in a collective,
  exits by itself (DDX_PEER_TIMEOUT_SECONDS=10) with one line naming process 1, not JAX's
  abort a minute later; the rerun of both resumes from the newest checkpoint."""
  wd = str(tmp_path / "wd")
  procs = _start_processes(wd)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.all_steps(wd):
      assert all(p.poll() is None for p in procs), open(f"{wd}.p0.log").read()[-3000:]
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code = procs[0].wait(timeout=120)
    waited = time.time() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = open(f"{wd}.p0.log").read()
  last = out.strip().splitlines()[-1]
  assert code == 1 and last.startswith(
    "ddx train: process 1 of 2 stopped responding 10 s ago (killed or its host lost); process 0 exits."
  ), out[-3000:]
  assert "Check failure" not in out and "Traceback" not in out and 10 <= waited < 60, (waited, out[-3000:])
  newest = checkpoint.latest_step(wd)
  procs = _start_processes(wd, stop="2")
  codes = [p.wait(timeout=300) for p in procs]
  out = open(f"{wd}.p0.log").read()
  assert codes == [0, 0] and f"resumed from {wd}/checkpoints/{newest}" in out, out[-3000:]
  assert checkpoint.latest_step(wd) == newest + 2


# SIGTERM while step 4 is being written in the background (the signal is sent the moment the
# asynchronous save has started): step 4 commits, the run checkpoints the next step and exits;
# the rerun ends bitwise where an uninterrupted run ends.
_SIGTERM_IN_SAVE = textwrap.dedent(
  """
    import os, signal, sys
    from ddx.training import checkpoint
    from tests._tiny import loop_run
    real = checkpoint.Checkpointer.save

    def save(self, step, items):
      real(self, step, items)
      if step == 4:
        os.kill(os.getpid(), signal.SIGTERM)

    checkpoint.Checkpointer.save = save
    s = loop_run(sys.argv[1], 12)
    print("STOPPED", s["step"], s["preempted"], flush=True)
    """
)


def test_sigterm_during_a_save_commits_and_resumes(tmp_path):
  wd = str(tmp_path / "wd")
  p = subprocess.run(
    [sys.executable, "-c", _SIGTERM_IN_SAVE, wd],
    cwd=ROOT,
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0 and "STOPPED 5 True" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
  assert "preemption signal: checkpoint at step 5 written" in p.stdout
  assert checkpoint.all_steps(wd) == [4, 5]
  assert all(checkpoint.verify(wd, s)[0] == "ok" for s in (4, 5))
  assert loop_run(wd, 12)["step"] == 12
  straight = str(tmp_path / "straight")
  loop_run(straight, 12)
  (sa, ia), (sb, ib) = saved(wd), saved(straight)
  assert sa == sb == 12
  for k in ("params", "ema_params", "opt_state", "train"):
    assert_bitwise_equal(ia[k], ib[k])


# The disk fills while step 8 is written (RLIMIT_FSIZE: writes past 16 KiB fail with EFBIG, as
# on a full disk they fail with ENOSPC; the checkpoint's data files are larger, config.json and
# the logs are not): one line, step 4 intact, step 8 not counted. (Resuming past the temporary
# directory a failed write leaves: test_train.py's half-written step.)
_DISK_FULL = textwrap.dedent(
  """
    import resource, signal, sys
    from ddx.cli.main import execute
    from tests._tiny import TRAIN_FLAGS
    wd = sys.argv[1]

    def train(*extra):
      sys.argv = ["ddx", "train", f"--workdir={wd}", *TRAIN_FLAGS, "--config.train.total_steps=12", *extra]
      return execute(sys.argv)

    assert train("--stop_after_steps=4") == 0
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
    sys.stderr.write("FULL\\n")
    print("FULL", train(), flush=True)
    """
)


def test_a_full_disk_during_a_save_is_one_line_and_nothing_is_lost(tmp_path):
  wd = str(tmp_path / "wd")
  p = subprocess.run(
    [sys.executable, "-c", _DISK_FULL, wd],
    cwd=ROOT,
    env=subprocess_env(8),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert "FULL 1" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
  full = p.stderr.split("FULL\n", 1)[1]
  # (XLA's own C++ warnings, "W1203 12:00:00.000 ...", are not ddx's to silence)
  lines = [line for line in full.splitlines() if not re.match(r"[IW]\d{4} \d\d:", line)]
  assert lines == [
    f"ddx train: error: checkpoint step 8 could not be written to {wd}/checkpoints: [Errno 27] File too large; it "
    "does not count as a step (the newest complete checkpoint, step 4, is intact). Free space and rerun the same "
    "command to resume."
  ], full[-3000:]
  assert checkpoint.all_steps(wd) == [4] and checkpoint.verify(wd, 4)[0] == "ok"
  assert os.path.isdir(f"{wd}/checkpoints/8.orbax-checkpoint-tmp")  # what was written of step 8, not a step
