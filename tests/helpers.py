"""Helpers shared by several test files: running the package's CLIs, reading compiled HLO."""

import os
import re
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, args: list[str], cwd, timeout=600,
               devices: int = 8) -> subprocess.CompletedProcess:
  """`python -m module args` in a fresh process on `devices` fake CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def collectives(hlo: str) -> list[tuple[str, int]]:
  """(op, number of elements of its result) for every collective in an HLO text."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r"= \(?([a-z0-9]+)\[([0-9,]*)\][^ ]* (all-gather|all-to-all|all-reduce|"
                  r"collective-permute|reduce-scatter)\(", line)
    if m:
      dims = [int(d) for d in m.group(2).split(",") if d]
      out.append((m.group(3), int(np.prod(dims)) if dims else 1))
  return out
