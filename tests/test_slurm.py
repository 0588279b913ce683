"""launch/slurm/train.sbatch against a real Slurm (munged + slurmctld + slurmd on localhost).

Two tasks on the one node stand in for two nodes: each process gets 4 fake CPU devices
through SAFE_CPU_DEVICES_PER_TASK, the same switch a CPU test cluster would use.
"""

import glob
import json
import os
import re
import shutil
import sys
import time

import pytest

import slurm_cluster

pytestmark = pytest.mark.slurm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")
FAKE_TRAINER = os.path.join(REPO, "tests", "fake_trainer.sh")
# Two processes on one node, no GPUs: overrides the script's `#SBATCH` layout.
TWO_TASKS = ["-N", "1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
             "--time=10"]
# The job environment: conftest's 8 fake devices must not leak into the jobs; the jobs run
# this interpreter, wherever the package is installed.
CPU_ENV = {"SAFE_CPU_DEVICES_PER_TASK": "4", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
           "SAFE_PYTHON": sys.executable}


@pytest.fixture(scope="session")
def slurm():
  why = slurm_cluster.missing_requirements()
  if why:
    pytest.skip(why)
  with slurm_cluster.local_slurm() as cluster:
    yield cluster


def _submit(slurm, tmp_path, args, env=None, sbatch_args=()):
  """train.sbatch from the repo root (its default SAFE_REPO); logs under tmp_path/logs."""
  os.makedirs(tmp_path / "logs", exist_ok=True)
  job = slurm.sbatch(TRAIN_SBATCH, args, env={**CPU_ENV, **(env or {})},
                     sbatch_args=[f"--chdir={tmp_path}", *TWO_TASKS, *sbatch_args], cwd=REPO)
  return job, tmp_path / "logs" / f"safe-train-{job}.out"


def _read(path) -> str:
  return path.read_text(errors="replace") if path.exists() else ""


def _wait_done(slurm, job, log, timeout):
  """Waits for the job to finish; a requeued job is released as soon as Slurm allows."""
  deadline = time.time() + timeout
  held_since = None
  while time.time() < deadline:
    info = slurm.job_info(job)
    state = info.get("JobState", "UNKNOWN")
    if state in slurm_cluster.TERMINAL_STATES:
      return state
    if state == "PENDING" and info.get("Reason") == "BeginTime":
      # Slurm holds a requeued job until its old credential expires, then waits for the
      # next scheduling pass (up to a minute); nudge it right after the expiry.
      held_since = held_since or time.time()
      if time.time() - held_since > slurm_cluster.CRED_EXPIRE + 2:
        slurm.release(job)
    else:
      held_since = None
    time.sleep(0.5)
  raise AssertionError(f"job {job} not done after {timeout}s: {slurm.job_info(job)}\n"
                       f"{_read(log)[-3000:]}")


def _wait_for(predicate, what, timeout, log):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.5)
  raise AssertionError(f"no {what} after {timeout}s\n{_read(log)[-3000:]}")


def test_smoke_two_tasks(slurm, tmp_path):
  script = tmp_path / "hello.sbatch"
  script.write_text("#!/bin/bash\nsrun bash -c 'echo hello from task $SLURM_PROCID of "
                    "$SLURM_STEP_NUM_TASKS'\n")
  job = slurm.sbatch(str(script), sbatch_args=["-n", "2", f"--output={tmp_path}/out.txt"])
  assert slurm.wait(job, timeout=60) == "COMPLETED", slurm.log_tail()
  out = (tmp_path / "out.txt").read_text()
  assert sorted(re.findall(r"hello from task (\d) of 2", out)) == ["0", "1"], out


@pytest.mark.parametrize("how", ["time_limit", "batch"])
def test_requeue_on_signal(slurm, tmp_path, how):
  """Exit 85 after a signal -> `scontrol requeue`; the rerun sees SLURM_RESTART_COUNT=1.

  `time_limit`: the script's `--signal=USR1@...` (no `B:`), here 45 s before a 1 min limit:
  Slurm signals the srun'd processes themselves.
  `batch`: SIGTERM to the batch shell only (`--signal=B:...`, `scancel --batch`), which
  passes it on as SIGUSR1.
  """
  limit = ["--time=1", "--signal=USR1@45"] if how == "time_limit" else []
  job, log = _submit(slurm, tmp_path, ["--config", "config:debug", "--workdir", "w w"],
                     env={"SAFE_PYTHON": FAKE_TRAINER}, sbatch_args=limit)
  _wait_for(lambda: _read(log).count("FAKE start restart=0") == 2, "start", 60, log)
  if how == "batch":
    slurm.scancel(job, "TERM", "--batch")
  state = _wait_done(slurm, job, log, 90)
  out = _read(log)
  assert state == "COMPLETED", (state, " ".join(f"{k}={v}" for k, v in slurm.job_info(job).items()), out)
  assert out.count("FAKE got USR1") == 2, out
  assert "requeueing job" in out, out
  assert out.count("FAKE done") == 2, out
  assert slurm.job_info(job)["Restarts"] == "1"
  first_host = slurm.host
  assert f"coordinator={first_host}:{61440 + job % 4096}" in out, out
  assert "--xla_force_host_platform_device_count=4" in out
  assert "args=-m safe_dist.train --config config:debug --workdir w w" in out, out


def test_debug_sbatch_adds_debug_flag(slurm, tmp_path):
  os.makedirs(tmp_path / "logs")
  job = slurm.sbatch(os.path.join(REPO, "launch", "slurm", "debug.sbatch"),
                     ["--config", "config:debug", "--workdir", "w"],
                     env={**CPU_ENV, "SAFE_CPU_DEVICES_PER_TASK": "1",
                          "SAFE_PYTHON": FAKE_TRAINER},
                     sbatch_args=[f"--chdir={tmp_path}", "--gpus-per-node=0",
                                  "--cpus-per-task=1"], cwd=REPO)
  log = tmp_path / "logs" / f"safe-debug-{job}.out"
  _wait_for(lambda: "FAKE start restart=0" in _read(log), "start", 60, log)
  slurm.scancel(job, "USR1")
  assert _wait_done(slurm, job, log, 60) == "COMPLETED", _read(log)
  out = _read(log)
  assert "ntasks=1 " in out, out
  assert "args=-m safe_dist.train --debug --config config:debug --workdir w" in out, out
  assert out.count("FAKE done") == 1, out


def test_without_venv_runs_the_submitters_python3(slurm, tmp_path):
  """No .venv and no SAFE_PYTHON: the job runs the python3 first on the PATH of the shell
  that ran sbatch (a conda env, a venv elsewhere), as sbatch exports that environment."""
  repo = tmp_path / "repo"  # A repository copy without .venv.
  shutil.copytree(os.path.join(REPO, "launch"), repo / "launch")
  python3 = tmp_path / "bin" / "python3"
  python3.parent.mkdir()
  python3.write_text('#!/bin/bash\necho "FAKE $0 procid=$SLURM_PROCID args=$*"\n')
  python3.chmod(0o755)
  os.makedirs(tmp_path / "logs")
  job = slurm.sbatch(str(repo / "launch" / "slurm" / "train.sbatch"), ["--workdir", "w"],
                     env={**CPU_ENV, "SAFE_PYTHON": "", "SAFE_REPO": "",
                          "PATH": f"{python3.parent}:{os.environ['PATH']}"},
                     sbatch_args=[f"--chdir={tmp_path}", *TWO_TASKS], cwd=str(repo))
  log = tmp_path / "logs" / f"safe-train-{job}.out"
  assert _wait_done(slurm, job, log, 60) == "COMPLETED", _read(log)
  out = _read(log)
  assert f"2 processes of {python3}," in out, out
  started = re.findall(rf"FAKE {re.escape(str(python3))} procid=(\d) "
                       r"args=-m safe_dist\.train --workdir w", out)
  assert sorted(started) == ["0", "1"], out


def _committed_steps(workdir) -> list[int]:
  steps = []
  for d in glob.glob(os.path.join(workdir, "checkpoints", "*")):
    name = os.path.basename(d)
    if name.isdigit() and os.path.exists(os.path.join(d, "commit_success.txt")):
      steps.append(int(name))
  return sorted(steps)


def test_train_two_processes_preempt_requeue_resume(slurm, tmp_path):
  """A two-process training job: SIGTERM after its first checkpoint -> checkpoint, exit 85,
  requeue; the rerun resumes from that checkpoint and finishes the run (summary, TensorBoard
  events, final checkpoint).

  Each step waits on a cross-process all-reduce (0.1-0.3 s on two CPU cores), so the stop
  lands long before step 100; evaluations and Hessian probes would only add compilation and
  are off (test_multihost.py runs them on two processes).
  """
  workdir = tmp_path / "run"
  total = 100  # Signals are acted on every 10 steps (distributed.StopCheck, every 10 checks).
  job, log = _submit(slurm, tmp_path, [
      "--config", "config:debug", "--config", f"set:train.max_steps={total}",
      "--config", "set:train.eval_every_epochs=100",
      "--config", "set:train.sharpness_every_epochs=0", "--workdir", str(workdir)])
  _wait_for(lambda: _committed_steps(workdir), "committed checkpoint", 180, log)
  # What `--signal=USR1@300` would do ahead of the time limit; TERM is handled alike.
  slurm.scancel(job, "TERM")
  _wait_for(lambda: "requeueing job" in _read(log) or
            slurm.job_state(job) in slurm_cluster.TERMINAL_STATES, "requeue", 60, log)
  out = _read(log)
  stopped = [int(s) for s in re.findall(r"stopped by signal \S+ at step (\d+)", out)]
  assert "requeueing job" in out, out[-5000:]
  assert stopped and stopped[0] < total, out[-5000:]
  assert stopped[0] in _committed_steps(workdir)
  state = _wait_done(slurm, job, log, 240)
  out = _read(log)
  assert state == "COMPLETED", out[-5000:]
  assert slurm.job_info(job)["Restarts"] == "1"
  assert re.search(rf"resum\w* from the checkpoint of step {stopped[0]}\b", out), out[-5000:]
  for i in range(2):
    assert len(re.findall(rf"process_index {i} process_count 2 \(slurm\): 4 local / 8 global",
                          out)) == 2, out[-5000:]  # both processes, before and after the requeue
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == total
  assert glob.glob(str(workdir / "tensorboard" / "**" / "*tfevents*"), recursive=True)
  assert total in _committed_steps(workdir)
