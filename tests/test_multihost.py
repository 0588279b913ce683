"""2 processes x 4 fake CPU devices train exactly like 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from safe_dist import run_setup
from safe_dist.checkpointing import Checkpointer
from trainer_helpers import debug_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The debug config as it is (24 steps): the one-process run's programs are those of the other
# 8-device debug runs of the suite, already in the shared compilation cache.
TRAIN = [sys.executable, "-m", "safe_dist.train", "--config", "config:debug"]


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _final_params(workdir: str):
  exp = debug_experiment()
  run = run_setup.setup(exp)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  state = checkpointer.restore(checkpointer.latest_step(), run.abstract_state)
  checkpointer.close()
  return jax.device_get(state)


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  subprocess.run(TRAIN + ["--workdir", single], env=_env(8), cwd=ROOT, check=True,
                 capture_output=True, timeout=600)
  port = _free_port()
  procs = [subprocess.Popen(
      TRAIN + ["--workdir", multi, "--coordinator_address", f"127.0.0.1:{port}",
               "--num_processes", "2", "--process_id", str(i)],
      env=_env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert "process_count 2" in logs[1] and "8 global devices" in logs[1]

  with open(os.path.join(single, "summary.json")) as f:
    want = json.load(f)
  with open(os.path.join(multi, "summary.json")) as f:
    got = json.load(f)
  for key in ("val_accuracy", "val_loss", "weight_sparsity", "steps"):
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
  a, b = _final_params(single), _final_params(multi)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # Only process 0 writes TensorBoard events.
  events = [f for _, _, fs in os.walk(os.path.join(multi, "tensorboard")) for f in fs]
  assert len(events) == 1
