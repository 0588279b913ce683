"""Multi-process JAX start-up: explicit flags, Slurm job steps, or a single process.

`initialize` must run before anything else touches a JAX backend. Three cases:

* explicit `--coordinator_address/--num_processes/--process_id` (e.g. `launch/local.sh`);
* a Slurm job step (`srun`) with more than one task: the parameters come from the step's
  environment, the coordinator from `$SAFE_COORDINATOR_ADDRESS` (set by
  `launch/slurm/train.sbatch`) or else the step's first node, as `jax.distributed` would;
* anything else: a single process, nothing to do.

We do not call jax's own Slurm auto-detection: it restricts every process to the one GPU
numbered `$SLURM_LOCALID`, which with one process per node (our choice, see
`launch/slurm/train.sbatch`) would leave all but the first GPU of each node idle.
"""

import os
import re
import socket
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

COORDINATOR_ENV = "SAFE_COORDINATOR_ADDRESS"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def _expand_tasks_per_node(spec: str) -> list[int]:
  """Slurm's `2(x3),1` -> [2, 2, 2, 1]."""
  counts = []
  for part in spec.split(","):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if not m:
      raise ValueError(f"cannot parse Slurm tasks-per-node {spec!r}")
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  return counts


def _first_host(nodelist: str) -> str:
  """First host of a Slurm node list such as `gpu[003-007,9],cpu1` -> `gpu003`."""
  m = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist)
  if not m:
    raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
  return m.group(1) + (m.group(2) or "")


def slurm_step() -> Optional[dict]:
  """The distributed parameters of the current `srun` step, or None outside one.

  The batch shell of an `sbatch` job carries `SLURM_NTASKS` too, but no step task list:
  only processes started by `srun` (which set `SLURM_STEP_NUM_TASKS`) count as a step.
  """
  num = _env_int("SLURM_STEP_NUM_TASKS")
  if num is None or "SLURM_PROCID" not in os.environ or "SLURM_JOB_ID" not in os.environ:
    return None
  node_id = _env_int("SLURM_NODEID") or 0
  per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE")
  tasks_here = _expand_tasks_per_node(per_node)[node_id] if per_node else 1
  coordinator = os.environ.get(COORDINATOR_ENV)
  if not coordinator:
    # As jax.distributed does: first node of the step, a port derived from the job id.
    port = os.environ.get("JAX_COORDINATOR_PORT") or str(
        int(os.environ["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    coordinator = f"{_first_host(os.environ['SLURM_STEP_NODELIST'])}:{port}"
  return {"coordinator_address": coordinator, "num_processes": num,
          "process_id": int(os.environ["SLURM_PROCID"]),
          "local_id": _env_int("SLURM_LOCALID") or 0, "tasks_on_node": tasks_here}


def _local_device_ids(tasks_on_node: int, local_id: int) -> Optional[Sequence[int]]:
  """GPUs this process drives: all of the node's unless several processes share the node."""
  if tasks_on_node <= 1 or os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return None
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None and len([d for d in visible.split(",") if d.strip()]) <= 1:
    return None  # Slurm already bound one GPU per task (--gpus-per-task=1).
  return [local_id]  # One process per GPU sharing the node's GPUs.


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts multi-process JAX when flags or a Slurm step ask for it; else does nothing."""
  explicit = (coordinator_address, num_processes, process_id)
  local_ids = None
  if any(v is not None for v in explicit):
    if None in explicit:
      raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                       f"got {explicit}")
    how = "flags"
  elif (step := slurm_step()) is not None and step["num_processes"] > 1:
    coordinator_address = step["coordinator_address"]
    num_processes, process_id = step["num_processes"], step["process_id"]
    local_ids = _local_device_ids(step["tasks_on_node"], step["local_id"])
    how = "slurm"
  else:
    _log_devices("single process")
    return

  # Cross-process collectives of the CPU backend (CPU test clusters, fake devices); the CPU
  # client exists on GPU hosts too, so this is harmless there.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d, "
               "local_device_ids=%s) from %s on %s", coordinator_address, num_processes,
               process_id, local_ids, how, socket.gethostname())
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_ids,
                             cluster_detection_method="deactivate")
  _log_devices(how)


def _log_devices(how: str) -> None:
  logging.info("process_index %d process_count %d (%s): %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), how, jax.local_device_count(),
               jax.device_count(), jax.local_devices()[0].device_kind)


def is_main_process() -> bool:
  """True on process 0 (the one that writes summaries and prints)."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (e.g. a stop signal seen by one).

  A collective: every process must call it at the same point (say every N steps).
  """
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))
  return bool(np.asarray(flags).any())


def from_first_process(values: np.ndarray) -> np.ndarray:
  """Process 0's `values` on every process (a collective; identity with one process)."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.broadcast_one_to_all(values))


class Interrupted(Exception):
  """A stop was requested in the middle of a long phase (evaluation, sharpness, ...)."""


class StopCheck:
  """`stop_requested()` made collective: True on every process once any process saw a stop.

  With one process it asks at every call. With several, every `every`-th call is a tiny
  all-gather (`any_process`); the other calls answer False. Every process must call it the
  same number of times (once per step, per evaluation batch, ...), so all stop together.
  """

  def __init__(self, stop_requested: Callable[[], bool], every: int = 10):
    self.stop_requested, self.every, self.calls = stop_requested, every, 0

  def __call__(self) -> bool:
    if jax.process_count() == 1:
      return bool(self.stop_requested())
    self.calls += 1
    return self.calls % self.every == 0 and any_process(self.stop_requested())
