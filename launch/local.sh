#!/usr/bin/env bash
# Multi-process training on this machine: N JAX processes joined through a coordinator on
# 127.0.0.1, each with SAFE_CPU_DEVICES_PER_TASK (default 4) fake CPU devices. This is how
# the multi-host code paths (process-local data, cross-process checkpoints) are exercised
# without a cluster.
#
#   launch/local.sh 2 --config config:debug --workdir /tmp/run
#
# Logs: <workdir>/logs/process_<i>.log (or $LOG_DIR/process_<i>.log). SIGINT/SIGTERM are
# forwarded to all processes (the trainer checkpoints and exits 85). Exit status: 0 if all
# processes succeeded, else the first non-zero status seen.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [safe_dist.train args...]" >&2
  exit 2
fi
num_processes="$1"
shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
# The interpreter: $SAFE_PYTHON, else the repository's .venv, else the python3 on PATH (the
# package installed with conda, in a venv elsewhere, through modules).
python="${SAFE_PYTHON:-}"
if [[ -z "$python" && -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; fi
if [[ -z "$python" ]] && ! python="$(command -v python3)"; then
  echo "local.sh: no $repo/.venv and no python3 on PATH; set SAFE_PYTHON" >&2
  exit 2
fi

# The log directory follows --workdir (either spelling) unless LOG_DIR is set.
workdir="./logdir"  # safe_dist.train's default --workdir
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --workdir=*) workdir="${args[i]#--workdir=}" ;;
    --workdir) workdir="${args[i + 1]:-$workdir}" ;;
  esac
done
log_dir="${LOG_DIR:-$workdir/logs}"
mkdir -p "$log_dir"

# A free port chosen by the kernel; process 0 binds it moments later.
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
coordinator="127.0.0.1:$port"

export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${SAFE_CPU_DEVICES_PER_TASK:-4}"
export PYTHONUNBUFFERED=1
# Outside a Slurm step on purpose: a SLURM_* environment must not override the flags.
unset SLURM_STEP_NUM_TASKS SLURM_PROCID

pids=()
forward() {
  echo "local.sh: got SIG$1, forwarding to ${pids[*]}" >&2
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward INT' INT
trap 'forward TERM' TERM

for ((i = 0; i < num_processes; i++)); do
  # setsid-less background jobs: Ctrl-C reaches the children through the trap, once.
  "$python" -m safe_dist.train "$@" --coordinator_address "$coordinator" \
      --num_processes "$num_processes" --process_id "$i" \
      >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: $num_processes processes (${pids[*]}) of $python, coordinator $coordinator," \
     "logs in $log_dir" >&2

# Wait for each process; `wait` returns early when a trapped signal arrives, so wait again
# while the process is still alive.
status=0
for i in "${!pids[@]}"; do
  while true; do
    rc=0
    wait "${pids[i]}" || rc=$?
    kill -0 "${pids[i]}" 2>/dev/null || break
  done
  if [[ "$rc" -ne 0 ]]; then
    echo "local.sh: process $i exited with status $rc (log: $log_dir/process_$i.log)" >&2
    [[ "$status" -ne 0 ]] || status="$rc"
  fi
done
exit "$status"
