"""Faults of a run at scale, each injected for real and survived with nothing lost: one of
two processes killed (the other stops by itself with one line), SIGTERM while a checkpoint is
being written, the disk filling during a save (the command's one-line report of a full disk
on a real tmpfs is in docs/reliability.md). (A second trainer on one workdir:
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
  env = subprocess_env(1, DDX_PEER_TIMEOUT_SECONDS="6")
  procs = []
  for pid in range(2):
    log = open(f"{workdir}.p{pid}.log", "w")
    cmd = [sys.executable, "-c", _TRAIN, str(pid), port, workdir, stop]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
  return procs


def test_a_killed_process_stops_the_others_with_one_line(tmp_path):
  """Process 1 of 2 killed with SIGKILL mid-run: process 0, left waiting in a collective,
  exits by itself (DDX_PEER_TIMEOUT_SECONDS=6) with one line naming process 1, not JAX's
  abort a minute later; the newest checkpoint verifies."""
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
    "ddx train: process 1 of 2 stopped responding 6 s ago (killed or its host lost); process 0 exits."
  ), out[-3000:]
  assert "Check failure" not in out and "Traceback" not in out and 6 <= waited < 60, (waited, out[-3000:])
  # what was committed verifies: the rerun resumes from it (the resume itself: test_preemption.py)
  assert checkpoint.verify(wd, checkpoint.latest_step(wd))[0] == "ok"


# Two faults of a save in one child process (PixelModel on one device):
# * SIGTERM while step 4 is being written in the background (sent the moment the asynchronous
#   save has started): step 4 commits, the run checkpoints the next step and exits;
# * the disk fills while step 4 of another workdir is written (RLIMIT_FSIZE: writes past 4 KiB
#   fail with EFBIG, as on a full disk they fail with ENOSPC; the checkpoint's data files are
#   larger, config.json and the logs are not), under the ddx command's handling of orbax's
#   background errors: the error is one line and nothing else reaches stderr.
_SAVE_FAULTS = textwrap.dedent(
  """
    import os, resource, signal, sys
    from ddx.cli import main
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
    checkpoint.Checkpointer.save = real

    main._quiet_background_errors()  # what `ddx <command>` installs
    assert loop_run(sys.argv[2], 8, stop_after_steps=2)["step"] == 2
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    sys.stderr.write("FULL\\n")
    try:
      loop_run(sys.argv[2], 8)
    except ValueError as e:
      sys.stderr.write(f"ddx train: error: {e}\\n")  # as `ddx train` reports it
    """
)


def test_sigterm_and_a_full_disk_during_saves_lose_nothing(tmp_path):
  wd, full = str(tmp_path / "wd"), str(tmp_path / "full")
  p = subprocess.run(
    [sys.executable, "-c", _SAVE_FAULTS, wd, full],
    cwd=ROOT,
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0 and "STOPPED 5 True" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
  # SIGTERM: both steps commit and verify; the rerun ends bitwise where an uninterrupted run ends
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
  # the full disk: one line, step 2 intact, step 4 only a temporary directory
  after = p.stderr.split("FULL\n", 1)[1]
  # (XLA's own C++ warnings, "W1203 12:00:00.000 ...", are not ddx's to silence)
  lines = [line for line in after.splitlines() if not re.match(r"[IW]\d{4} \d\d:", line)]
  assert len(lines) == 1 and re.fullmatch(
    f"ddx train: error: checkpoint step 4 could not be written to {full}/checkpoints: .*File too large.*; it does "
    r"not count as a step \(the newest complete checkpoint, step 2, is intact\)\. Free space and rerun the same "
    r"command to resume\.",
    lines[0],
  ), after[-3000:]
  assert checkpoint.all_steps(full) == [2] and checkpoint.verify(full, 2)[0] == "ok"
  assert os.path.isdir(f"{full}/checkpoints/4.orbax-checkpoint-tmp")
