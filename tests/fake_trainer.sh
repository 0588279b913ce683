#!/usr/bin/env bash
# Stands in for `python -m safe_dist.train` in tests/test_slurm.py: reports how it was
# started, then (first run only) waits for SIGUSR1/SIGTERM and exits 85 like the trainer.
set -euo pipefail
echo "FAKE start restart=${SLURM_RESTART_COUNT:-0} procid=$SLURM_PROCID ntasks=$SLURM_STEP_NUM_TASKS" \
     "coordinator=$SAFE_COORDINATOR_ADDRESS xla_flags=${XLA_FLAGS:-} args=$*"
if [[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]]; then
  echo "FAKE done procid=$SLURM_PROCID"
  exit 0
fi
trap 'echo "FAKE got USR1 procid=$SLURM_PROCID"; exit 85' USR1
trap 'echo "FAKE got TERM procid=$SLURM_PROCID"; exit 85' TERM
# Sleep in short pieces (bash runs traps only between commands); the step signal also hits
# `sleep`, whose failure must not trip `set -e` before the trap runs.
for _ in $(seq 600); do sleep 0.2 || true; done
exit 1
