"""A throwaway Slurm cluster on localhost (munged + slurmctld + slurmd) for tests.

Everything lives in a private temporary directory: munge key, socket and log, slurm.conf,
state, spool, pid and log files. `SLURM_CONF` is passed only to the commands run through
`SlurmCluster`, never exported to this process. The daemons are stopped by their pids.

    with local_slurm() as cluster:
      job = cluster.sbatch("script.sbatch", ["--flag"], sbatch_args=["-n", "2"])
      cluster.wait(job, {"COMPLETED"}, timeout=60)
"""

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterable, Iterator, Optional, Sequence

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
# Seconds a job credential lives; a requeued job may not start sooner (the slurmd revoked
# its old credential), so Slurm sets its begin time that far ahead. Slurm's default is 120.
CRED_EXPIRE = 10
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                             "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


class SlurmUnavailable(RuntimeError):
  """Raised when this machine cannot run the cluster (binaries or user missing)."""


def _free_ports(n: int) -> list[int]:
  socks = []
  try:
    for _ in range(n):
      s = socket.socket()
      s.bind(("", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def missing_requirements() -> Optional[str]:
  """Why no cluster can start here, or None."""
  missing = [b for b in DAEMONS if shutil.which(b) is None and
             not os.path.exists(os.path.join("/usr/sbin", b))]
  if missing:
    return f"Slurm/munge binaries missing: {', '.join(missing)} (apt-get install slurm-wlm munge)"
  if os.geteuid() != 0:
    return "a local Slurm cluster needs root (slurmd runs jobs as their users)"
  try:
    pwd.getpwnam("munge")
  except KeyError:
    return "no 'munge' user (install the munge package)"
  return None


def _binary(name: str) -> str:
  return shutil.which(name) or os.path.join("/usr/sbin", name)


def _read_pid(path: str) -> Optional[int]:
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


class SlurmCluster:
  """A running one-node cluster; helpers run the Slurm client commands against it."""

  def __init__(self, root: str, cpus: int = 2, memory_mb: int = 8000):
    self.root = root
    self.host = socket.gethostname().split(".")[0]
    self.cpus, self.memory_mb = cpus, memory_mb
    self.conf = os.path.join(root, "slurm.conf")
    self.munge_socket = os.path.join(root, "munge", "munge.socket")
    self._pid_files = {}

  # -- client helpers -------------------------------------------------------------------

  def env(self, extra: Optional[dict] = None) -> dict:
    """Environment for a client command: ours, minus any job's SLURM_*, plus SLURM_CONF."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = self.conf
    env.update(extra or {})
    return env

  def run(self, args: Sequence[str], check: bool = True, timeout: float = 30,
          env: Optional[dict] = None, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), env=self.env(env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
      raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}"
                         f"{proc.stderr}")
    return proc

  def sbatch(self, script: str, args: Sequence[str] = (), env: Optional[dict] = None,
             sbatch_args: Sequence[str] = (), cwd: Optional[str] = None) -> int:
    """Submits `script args...`; returns the job id. `env` is added to the job's environment."""
    out = self.run(["sbatch", "--parsable", *sbatch_args, script, *args], env=env,
                   cwd=cwd).stdout
    return int(out.strip().split(";")[0])

  def job_info(self, job_id: int) -> dict:
    """`scontrol show job` as a dict (empty once the job has left slurmctld's memory)."""
    proc = self.run(["scontrol", "show", "job", "--oneliner", str(job_id)], check=False)
    if proc.returncode != 0:
      return {}
    info = {}
    for token in proc.stdout.split():
      key, sep, value = token.partition("=")
      if sep:
        info[key] = value
    return info

  def job_state(self, job_id: int) -> str:
    return self.job_info(job_id).get("JobState", "UNKNOWN")

  def wait(self, job_id: int, states: Iterable[str] = TERMINAL_STATES, timeout: float = 120,
           poll: float = 0.5) -> str:
    """Waits until the job is in one of `states`; returns it (TimeoutError otherwise)."""
    states = frozenset(states)
    deadline = time.time() + timeout
    state = "UNKNOWN"
    while time.time() < deadline:
      state = self.job_state(job_id)
      if state in states:
        return state
      time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {state} after {timeout}s, not in {sorted(states)}"
                       f"\n{self.job_info(job_id)}")

  def scancel(self, job_id: int, sig: Optional[str] = None, *flags: str) -> None:
    """`scancel [--signal=SIG] [flags] job`: with a signal and no flags, only the steps get it."""
    args = ["scancel"] + ([f"--signal={sig}"] if sig else []) + list(flags) + [str(job_id)]
    self.run(args)

  def requeue(self, job_id: int) -> None:
    self.run(["scontrol", "requeue", str(job_id)])

  def release(self, job_id: int) -> None:
    """Makes a pending job eligible now. For a requeued job only once CRED_EXPIRE seconds
    have passed since the requeue: before, slurmd kills it (credential revoked)."""
    self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)

  def log_tail(self, n: int = 40) -> str:
    """The end of the daemons' logs (for failure messages)."""
    parts = []
    for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
      path = os.path.join(self.root, name)
      if os.path.exists(path):
        with open(path, errors="replace") as f:
          parts.append(f"== {name}\n" + "".join(f.readlines()[-n:]))
    return "\n".join(parts)

  # -- daemons --------------------------------------------------------------------------

  def _write_files(self) -> None:
    munge_dir = os.path.join(self.root, "munge")
    os.makedirs(munge_dir)
    munge = pwd.getpwnam("munge")
    # munged refuses keys and directories that others can read or write.
    os.chmod(self.root, 0o755)
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    os.chmod(munge_dir, 0o700)
    key = os.path.join(munge_dir, "munge.key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    os.chmod(key, 0o400)
    for d in ("state", "spool"):
      os.makedirs(os.path.join(self.root, d))
    ctld_port, slurmd_port = _free_ports(2)
    r = self.root
    conf = f"""\
ClusterName=safetest
SlurmctldHost={self.host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
    with open(self.conf, "w") as f:
      f.write(conf)

  def start(self, timeout: float = 60) -> None:
    self._write_files()
    m = os.path.join(self.root, "munge")
    self._pid_files["munged"] = os.path.join(m, "munged.pid")
    subprocess.run(["runuser", "-u", "munge", "--", _binary("munged"), "--force",
                    f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                    f"--seed-file={m}/munged.seed"], check=True, timeout=30,
                   capture_output=True)
    self._wait_for_file(self._pid_files["munged"], 10)
    self._pid_files["slurmctld"] = os.path.join(self.root, "slurmctld.pid")
    self._pid_files["slurmd"] = os.path.join(self.root, "slurmd.pid")
    # -i: ignore state left by nothing (fresh dir); daemons fork and write their pid files.
    self.run([_binary("slurmctld"), "-i"], timeout=30)
    self._wait_for_file(self._pid_files["slurmctld"], 15)
    self.run([_binary("slurmd")], timeout=30)
    self._wait_for_file(self._pid_files["slurmd"], 15)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
      state = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
      if state in ("idle", "mixed", "allocated"):
        return
      time.sleep(0.5)
    raise RuntimeError(f"node not idle after {timeout}s (sinfo: {state!r})\n{self.log_tail()}")

  def _wait_for_file(self, path: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while _read_pid(path) is None:
      if time.time() > deadline:
        raise RuntimeError(f"{path} did not appear within {timeout}s\n{self.log_tail()}")
      time.sleep(0.1)

  def stop(self) -> None:
    """Kills leftover jobs, stops slurmd, slurmctld and munged by their pids, then any
    slurmstepd of ours that outlived slurmd (they hold files in our spool directory)."""
    with contextlib.suppress(Exception):
      if _read_pid(self._pid_files.get("slurmctld", "")) is not None:
        self.run(["scancel", "--full", "--signal=KILL", "--user=root"], check=False, timeout=10)
        self.run(["scancel", "--user=root"], check=False, timeout=10)
        deadline = time.time() + 20
        while time.time() < deadline and self.run(["squeue", "-h"], check=False,
                                                  timeout=10).stdout.strip():
          time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
      pid = _read_pid(self._pid_files.get(name, ""))
      if pid is not None:
        _terminate(pid)
    for pid in self._our_stepds():
      _terminate(pid, grace=2)

  def _our_stepds(self) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
      if not entry.isdigit():
        continue
      with contextlib.suppress(OSError):
        with open(f"/proc/{entry}/comm") as f:
          if f.read().strip() != "slurmstepd":
            continue
        fds = os.listdir(f"/proc/{entry}/fd")
        if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(self.root + "/")
               for fd in fds if os.path.islink(f"/proc/{entry}/fd/{fd}")):
          pids.append(int(entry))
    return pids


def _terminate(pid: int, grace: float = 15) -> None:
  with contextlib.suppress(ProcessLookupError):
    os.kill(pid, signal.SIGTERM)
  deadline = time.time() + grace
  while time.time() < deadline and _alive(pid):
    time.sleep(0.1)
  if _alive(pid):
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  # A zombie of ours would still "exist": check its state.
  with contextlib.suppress(OSError):
    with open(f"/proc/{pid}/stat") as f:
      if re.search(r"\) Z ", f.read()):
        return False
  return True


@contextlib.contextmanager
def local_slurm(cpus: Optional[int] = None, keep: bool = False) -> Iterator[SlurmCluster]:
  """Starts a cluster in a fresh temp dir; stops it (and removes the dir unless `keep`)."""
  why = missing_requirements()
  if why:
    raise SlurmUnavailable(why)
  root = tempfile.mkdtemp(prefix="safe-slurm-")
  cluster = SlurmCluster(root, cpus=cpus or max(2, os.cpu_count() or 2))
  try:
    cluster.start()
    yield cluster
  finally:
    cluster.stop()
    if not keep:
      shutil.rmtree(root, ignore_errors=True)
