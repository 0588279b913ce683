"""Two real local JAX processes (4 fake CPU devices each) join one run via safe_dist.distributed."""

import os
import socket
import subprocess
import sys

import pytest

from safe_dist import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_agree_on_psum():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  for k in list(env):
    if k.startswith("SLURM_"):
      env.pop(k)  # Flags must win; no accidental Slurm step detection.
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "multiprocess_worker.py"),
                             coordinator, "2", str(i)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      # stdout alone: C++ logging on stderr could otherwise split the RESULT line.
      outs.append("%s\n--- stderr ---\n%s" % p.communicate(timeout=90))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out
    line = next((l for l in out.splitlines() if l.startswith("RESULT")), out)
    # sum(arange(8)) = 28 on both processes.
    assert line == (f"RESULT process={i} count=2 local=4 global=8 main={i == 0} any=True "
                    "sum=28.0"), out


def test_slurm_step_parsing(monkeypatch):
  for k in list(os.environ):
    if k.startswith("SLURM_") or k == distributed.COORDINATOR_ENV:
      monkeypatch.delenv(k)
  assert distributed.slurm_step() is None
  monkeypatch.setenv("SLURM_JOB_ID", "4097")
  monkeypatch.setenv("SLURM_NTASKS", "6")
  assert distributed.slurm_step() is None  # The batch shell is not a step.
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "6")
  monkeypatch.setenv("SLURM_PROCID", "4")
  monkeypatch.setenv("SLURM_LOCALID", "1")
  monkeypatch.setenv("SLURM_NODEID", "1")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[003-004,9],cpu1")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1,3(x2)")
  step = distributed.slurm_step()
  assert step == {"coordinator_address": "gpu003:61441", "num_processes": 6, "process_id": 4,
                  "local_id": 1, "tasks_on_node": 3}
  monkeypatch.setenv(distributed.COORDINATOR_ENV, "head:1234")
  assert distributed.slurm_step()["coordinator_address"] == "head:1234"


def test_local_device_ids(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert distributed._local_device_ids(1, 0) is None  # One process per node: all GPUs.
  assert distributed._local_device_ids(4, 2) == [2]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
  assert distributed._local_device_ids(4, 2) is None  # Slurm bound one GPU per task.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  assert distributed._local_device_ids(4, 2) is None


def test_explicit_flags_must_come_together():
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("127.0.0.1:1234", None, None)
