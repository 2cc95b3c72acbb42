"""Launchers: launch/slurm_gpu.sbatch run as a simulated SLURM job on this machine (a stand-in
`srun` starts the step's tasks with the variables a real step sets; all networking on
127.0.0.1), the SLURM device choice, and the TPU launcher's dry run."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ddx import parallel
from ddx.training import checkpoint
from tests._tiny import ROOT, TRAIN_FLAGS, xla_flags

SBATCH = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")

# srun as SLURM runs a step inside an allocation: every task gets the job's environment plus
# the step/task variables; by default each task sees every GPU of its node (gres binding is
# per step, not per task). The layout comes from the test (FAKE_* variables). Signals sent to
# srun go to every task; --kill-on-bad-exit=1 stops the others when one fails.
FAKE_SRUN = r"""#!PYTHON
import os, signal, subprocess, sys, time
nodes, per_node, gpus = (int(os.environ[k]) for k in ("FAKE_NODES", "FAKE_TASKS_PER_NODE", "FAKE_GPUS_PER_NODE"))
args, kill_on_bad_exit = sys.argv[1:], False
while args and args[0].startswith("-"):
  a = args.pop(0)
  if a != "--kill-on-bad-exit=1":
    sys.exit(f"srun (test stand-in): unsupported option {a}")
  kill_on_bad_exit = True
names = ["localhost"] + [f"node{i}" for i in range(1, nodes)]  # only the first must resolve (coordinator)
n = nodes * per_node
procs = []
for rank in range(n):
  node = rank // per_node
  env = dict(os.environ, SLURM_STEP_ID="0", SLURM_NTASKS=str(n), SLURM_NPROCS=str(n), SLURM_STEP_NUM_TASKS=str(n),
             SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node), SLURM_NODEID=str(node),
             SLURMD_NODENAME=names[node], SLURM_STEP_NODELIST=",".join(names), SLURM_STEP_NUM_NODES=str(nodes),
             SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURM_GPUS_ON_NODE=str(gpus),
             CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
  procs.append(subprocess.Popen(args, env=env))
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
status = 0
while any(p.poll() is None for p in procs):
  bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
  if bad and kill_on_bad_exit:
    for p in procs:
      if p.poll() is None:
        p.kill()
  time.sleep(0.05)
codes = [p.returncode for p in procs]
sys.exit(max((c if c >= 0 else 128 - c) for c in codes))
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$@" >> "$FAKE_SCONTROL_LOG"
"""


def _free_job_port():
  """A SLURM job id whose JAX coordinator port (61440 + id % 4096) is free on 127.0.0.1."""
  for offset in np.random.default_rng().permutation(4096):
    port = 61440 + int(offset)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return 4096 * 1000 + int(offset), port
  raise RuntimeError("no free port in 61440..65535")


def _slurm_env(tmp_path, nodes, tasks_per_node, gpus_per_node, devices_per_task, **extra):
  """The batch script's environment inside a simulated allocation, with srun/scontrol stand-ins first on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "srun").write_text(FAKE_SRUN.replace("PYTHON", sys.executable))
  (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
  for f in ("srun", "scontrol"):
    os.chmod(bin_dir / f, 0o755)
  job_id, port = _free_job_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "DDX_", "CUDA_"))}
  env.update(
    PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env.get("PATH", "")]),
    PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    DDX_VENV="",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=xla_flags(devices_per_task),
    # the coordinator (process 0) listens on loopback only; JAX's default is every interface
    JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
    SLURM_JOB_ID=str(job_id),
    SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_NNODES=str(nodes),
    SLURM_NTASKS=str(nodes * tasks_per_node),
    SLURM_NTASKS_PER_NODE=str(tasks_per_node),
    SLURM_JOB_NODELIST="localhost" if nodes == 1 else f"localhost,node[1-{nodes - 1}]",
    FAKE_NODES=str(nodes),
    FAKE_TASKS_PER_NODE=str(tasks_per_node),
    FAKE_GPUS_PER_NODE=str(gpus_per_node),
    FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
  )
  env.update(extra)
  return env, port


def _job(env, args, timeout=300):
  """Run the sbatch script with bash (its own session, so a timeout kills every task)."""
  p = subprocess.Popen(
    ["bash", SBATCH, *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  try:
    out, _ = p.communicate(timeout=timeout)
  finally:
    if p.poll() is None or p.returncode != 0:
      _kill_group(p)
  return p.returncode, out


def _kill_group(p):
  try:
    os.killpg(p.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  p.wait()


REPORT = re.compile(
  r"^process (\d+)/(\d+) \(host [^)]*\): (\d+) local (\w+) devices \[([^\]]*)\] of (\d+); (.*)$", re.M
)


def _reports(out):
  """{process index: (local hardware ids, total devices, process count, {key: value})} from `ddx info` lines."""
  found = {}
  for m in REPORT.finditer(out):
    ids = [int(d.split("#")[1]) for d in m.group(5).split(", ")]  # local hardware ids
    kv = dict(item.split("=", 1) for item in m.group(7).split())
    assert int(m.group(3)) == len(ids) and m.group(4) == "cpu"
    found[int(m.group(1))] = (ids, int(m.group(6)), int(m.group(2)), kv)
  return found


# --- which GPUs a SLURM task drives ---------------------------------------------------------


def test_slurm_local_device_ids():
  task3 = {"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  assert parallel.slurm_local_device_ids(task3) == [3]
  # SLURM bound the task to one GPU (--gpus-per-task=1): CUDA renumbers it 0
  assert parallel.slurm_local_device_ids({**task3, "CUDA_VISIBLE_DEVICES": "3"}) == [0]
  assert parallel.slurm_local_device_ids({"SLURM_LOCALID": "2"}) == [2]  # nothing to check against
  per_node = {"SLURM_LOCALID": "0", "DDX_GPUS_PER_PROCESS": "all", "SLURM_NTASKS_PER_NODE": "1"}
  assert parallel.slurm_local_device_ids({**per_node, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == [0, 1, 2, 3]
  assert parallel.slurm_local_device_ids({**per_node, "SLURM_GPUS_ON_NODE": "8"}) == list(range(8))
  assert parallel.slurm_local_device_ids({**task3, "JAX_LOCAL_DEVICE_IDS": "1,2"}) == [1, 2]
  bad = [
    ({**task3, "CUDA_VISIBLE_DEVICES": "0,1"}, "SLURM_LOCALID: GPU ordinal"),
    ({**task3, "CUDA_VISIBLE_DEVICES": "3", "JAX_LOCAL_DEVICE_IDS": "3"}, "JAX_LOCAL_DEVICE_IDS: GPU ordinal"),
    ({**task3, "JAX_LOCAL_DEVICE_IDS": "0;1"}, "JAX_LOCAL_DEVICE_IDS: must be"),
    (per_node, "DDX_GPUS_PER_PROCESS: all needs CUDA_VISIBLE_DEVICES"),
    ({**per_node, "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"}, "--ntasks-per-node=1"),
    ({**task3, "DDX_GPUS_PER_PROCESS": "2"}, "DDX_GPUS_PER_PROCESS: must be 1 or all"),
  ]
  for env, msg in bad:
    with pytest.raises(ValueError, match=re.escape(msg)):
      parallel.slurm_local_device_ids(env)


# --- simulated SLURM jobs -------------------------------------------------------------------


def test_slurm_one_task_per_gpu_device_report(tmp_path):
  """1 node, 2 tasks, 2 GPUs: task i drives GPU i among the 2 CUDA shows it."""
  env, port = _slurm_env(tmp_path, nodes=1, tasks_per_node=2, gpus_per_node=2, devices_per_task=1)
  rc, out = _job(env, ["info"], timeout=600)
  assert rc == 0, out[-3000:]
  reports = _reports(out)
  assert sorted(reports) == [0, 1], out[-3000:]
  for i, (ids, total, count, kv) in reports.items():
    assert count == 2 and total == 2 and ids == [0]
    assert kv["coordinator"] == f"localhost:{port}"  # what JAX derived from SLURM_STEP_NODELIST + SLURM_JOB_ID
    assert kv["CUDA_VISIBLE_DEVICES"] == "0,1" and kv["SLURM_LOCALID"] == str(i) and kv["SLURM_PROCID"] == str(i)
    assert kv["local_device_ids"] == str(i)  # jax_cuda_visible_devices as jax.distributed set it
    assert kv["DDX_GPUS_PER_PROCESS"] == "1"
  # the dry run shows the same srun line and runs nothing
  rc, dry = _job({**env, "DDX_DRY_RUN": "1"}, ["info"], timeout=60)
  assert rc == 0 and "srun --kill-on-bad-exit=1 python -m ddx info" in dry and "process 0/" not in dry, dry


def test_slurm_one_task_per_node_device_report(tmp_path):
  """2 nodes x 1 task driving all (2) GPUs of its node. (Training over such a job is the
  SIGTERM test below; that 2 processes x 2 devices train like one process with 4 is
  tests/multiprocess/test_multihost.py, launched locally: the launch differs, not the run.)"""
  env, port = _slurm_env(
    tmp_path, nodes=2, tasks_per_node=1, gpus_per_node=2, devices_per_task=2, DDX_GPUS_PER_PROCESS="all"
  )
  rc, out = _job(env, ["info"], timeout=600)
  assert rc == 0, out[-3000:]
  reports = _reports(out)
  assert sorted(reports) == [0, 1], out[-3000:]
  for i, (ids, total, count, kv) in reports.items():
    assert count == 2 and total == 4 and ids == [0, 1]
    assert kv["coordinator"] == f"localhost:{port}"
    assert kv["SLURM_NODEID"] == str(i) and kv["SLURM_LOCALID"] == "0" and kv["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert kv["local_device_ids"] == "0,1"  # JAX's own SLURM default would be [SLURM_LOCALID] = 0
  assert not os.path.exists(tmp_path / "scontrol.log")  # a job that ends by itself is not requeued


def test_slurm_sigterm_checkpoints_and_requeues(tmp_path):
  """A 2-node job, one task per node driving its 2 GPUs, trains; SIGTERM to the batch script
  (--signal=B:TERM) reaches every task through srun: they checkpoint and exit cleanly, and
  the script requeues the job."""
  env, _ = _slurm_env(
    tmp_path, nodes=2, tasks_per_node=1, gpus_per_node=2, devices_per_task=2, DDX_GPUS_PER_PROCESS="all"
  )
  wd = str(tmp_path / "t")
  p = subprocess.Popen(
    [
      "bash",
      SBATCH,
      "train",
      f"--workdir={wd}",
      *TRAIN_FLAGS,
      "--config.train.total_steps=100000",
      "--config.train.checkpoint_every=50000",
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  try:
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 900
    while time.time() < deadline and p.poll() is None:
      if os.path.exists(metrics) and os.path.getsize(metrics):  # both tasks are in the training loop
        break
      time.sleep(0.2)
    assert p.poll() is None, p.communicate()[0][-3000:]
    p.send_signal(signal.SIGTERM)  # the batch shell only, as SLURM does with B:TERM
    out, _ = p.communicate(timeout=600)
  finally:
    if p.poll() is None:
      _kill_group(p)
  assert p.returncode == 0, out[-3000:]
  assert "4 devices (2 processes)" in out, out[-3000:]
  assert "preemption signal" in out and "requeueing job" in out, out[-3000:]
  assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]]
  step = checkpoint.latest_step(wd)
  assert step is not None and 0 < step < 100000


# --- TPU pod launcher -----------------------------------------------------------------------


def test_tpu_pod_dry_run_ships_this_checkout():
  head = subprocess.run(
    ["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
  ).stdout.strip()
  env = {k: v for k, v in os.environ.items() if not k.startswith("DDX_")}
  p = subprocess.run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "my-pod",
      "us-central2-b",
      "--project",
      "my-proj",
      "--dry-run",
      "--",
      "--config=configs/cifar10.py",
      "--workdir=gs://bucket/run 1",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 4, p.stdout
  pack, copy, install, run = lines
  assert pack.startswith("bash -c ") and f" {ROOT} " in pack and "git -C" in pack and "archive" in pack
  tarball = pack.split()[-1]
  assert os.path.basename(tarball).startswith(f"ddx-src-{head}") and tarball.endswith(".tar.gz")
  assert copy.startswith("gcloud compute tpus tpu-vm scp ") and tarball in copy
  remote = os.path.basename(tarball)
  assert f"my-pod:{remote}" in copy
  assert install.startswith("gcloud compute tpus tpu-vm ssh my-pod ") and f"tar -xzf ~/{remote}" in install
  assert "jax[tpu]" in install and '-e "$HOME/ddx[gcs]"' in install
  assert run.startswith("gcloud compute tpus tpu-vm ssh my-pod ")
  assert "cd ~/ddx" in run and "DDX_DISTRIBUTED=auto python -m ddx train --config=configs/cifar10.py" in run
  assert "gs://bucket/run" in run
  for line in (copy, install, run):
    assert "--zone us-central2-b --project my-proj --worker=all" in line
  assert not re.search(r"your-org|example\.com|<[a-z_]+>|github\.com", p.stdout), p.stdout
  # the pack command, run as printed, archives this checkout
  out_dir = os.path.dirname(tarball)
  assert os.path.isdir(out_dir)
  try:
    subprocess.run(["bash", "-c", pack], check=True, timeout=120)
    listing = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True, check=True).stdout.split()
    assert "launch/tpu_pod.sh" in listing and "ddx/parallel.py" in listing and "pyproject.toml" in listing
  finally:
    if os.path.exists(tarball):
      os.remove(tarball)
  # the alternative needs both --repo and --ref
  p = subprocess.run(
    ["bash", "launch/tpu_pod.sh", "my-pod", "z", "--dry-run", "--repo", "https://host/x.git", "--", "info"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert p.returncode == 2 and "--repo and --ref go together" in p.stderr
  p = subprocess.run(
    [
      "bash",
      "launch/tpu_pod.sh",
      "my-pod",
      "z",
      "--dry-run",
      "--repo",
      "https://host/x.git",
      "--ref",
      "v1",
      "--",
      "info",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert p.returncode == 0 and len(p.stdout.strip().splitlines()) == 2, p.stdout
  assert "git clone -q https://host/x.git ~/ddx" in p.stdout and "checkout -q v1" in p.stdout
  assert "python -m ddx info" in p.stdout
