#!/usr/bin/env bash
# One GPU check in at most 8 minutes: prints the projection benchmark (2^24..2^28 weights),
# the train step of ResNet20x2 and VGG19-bn on CIFAR-shaped random data (dense SGD, SAM,
# SAFE; bfloat16 compute as --half_precision), one LLaMA-2-7B-shaped block pruned by each
# layer-wise method, and the peak device memory of each part. Runs offline on a fresh machine:
#
#   launch/gpu_check.sh --venv /path/to/venv        # an environment that has safe-dist
#   launch/gpu_check.sh --wheels /path/to/wheels    # installs from a wheel directory, no index
#   launch/gpu_check.sh                             # $SAFE_PYTHON, ./.venv or python3
#
# --out DIR (default gpu_check_<date>) gets one log per part and summary.md (everything
# printed). --parts a,b runs only the named parts and --limit_scale N multiplies their time
# limits (a rerun of those that ran out).
# --dry_run: tiny sizes, LeNet300-100 for the step, any backend: a CPU rehearsal of the
# script itself.
# Each part has its own time limit; a part that fails or runs out is reported and the rest
# go on. Exit status: the number of failed parts.
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${SAFE_PYTHON:-}"
out="gpu_check_$(date +%Y%m%d_%H%M%S)"
dry_run=0
wheels=""
parts=""  # empty: every part
limit_scale=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) python="$2/bin/python"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --parts) parts="$2"; shift 2 ;;
    --limit_scale) limit_scale="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (allowed: --venv DIR, --wheels DIR, --out DIR," \
            "--parts a,b, --limit_scale N, --dry_run)" >&2; exit 2 ;;
  esac
done
if [[ ! "$limit_scale" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_check.sh: --limit_scale must be a positive integer, got '$limit_scale'" >&2
  exit 2
fi
if [[ "$dry_run" == 1 ]]; then models=(LeNet300-100); else models=(ResNet20x2 VGG19-bn); fi
block_methods=(magnitude wanda sparsegpt safe safe_plus)
all_parts=(projection "${models[@]/#/step_}" "${block_methods[@]/#/block_}")
for name in ${parts//,/ }; do
  if [[ " ${all_parts[*]} " != *" $name "* ]]; then
    echo "gpu_check.sh: --parts: unknown part '$name' (allowed: ${all_parts[*]})" >&2
    exit 2
  fi
done
if [[ -e "$out" && -n "$(ls -A "$out" 2>/dev/null)" ]]; then
  echo "gpu_check.sh: --out $out exists and is not empty (nothing is overwritten)" >&2
  exit 2
fi
mkdir -p "$out"
if [[ -n "$wheels" ]]; then
  python3 -m venv "$out/venv" || exit 2
  "$out/venv/bin/pip" install -q --no-index --find-links "$wheels" "safe-dist[cuda]" || {
    echo "gpu_check.sh: installing from $wheels failed (it needs safe-dist and its" \
         "dependencies, jax's CUDA plugin included, as wheels)" >&2; exit 2; }
  python="$out/venv/bin/python"
fi
if [[ -z "$python" && -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; fi
python="${python:-python3}"
summary="$out/summary.md"

platform="$("$python" -c 'import jax; print(jax.devices()[0].platform)' 2>"$out/jax.log")"
if [[ "$platform" != "gpu" && "$dry_run" == 0 ]]; then
  echo "gpu_check.sh: JAX sees no GPU (platform '${platform:-none}', see $out/jax.log);" \
       "--dry_run rehearses on any backend" >&2
  exit 2
fi

# Sizes: the check's, or tiny ones for --dry_run.
if [[ "$dry_run" == 1 ]]; then
  proj=(--min_log2 16 --max_log2 18 --step 1 --repeats 2 --sort_max_log2 16)
  step=(--batch_size 8 --warmup 1 --windows 1 --dual_update_interval 2 --memory_config ""
        --half_precision)
  block=(--scale 32 --nsamples 4 --seqlen 64 --batch_size 2 --epochs 1)
  scale=$((10 * limit_scale))  # time limits x 10: a CPU compiles slowly
  export JAX_THREEFRY_PARTITIONABLE=0  # the initialisations compile ~4x faster on a CPU
else
  proj=(--min_log2 24 --max_log2 28 --step 1 --repeats 5 --sort_max_log2 24)
  step=(--batch_size 128 --warmup 3 --windows 2 --dual_update_interval 16 --memory_config ""
        --half_precision)
  # 7B's block at 16 x 2048 calibration tokens; SAFE's 2 epochs of 2 steps give its step
  # time (the reference runs 30 epochs of 16 steps: multiply).
  block=(--scale 1 --nsamples 16 --seqlen 2048 --batch_size 8 --epochs 2)
  scale=$limit_scale
fi
# Seconds per part (step_<model> parts use [step]); together 465 s: the check ends within 8
# minutes.
declare -A limits=([projection]=45 [step]=90 [block_magnitude]=30
                   [block_wanda]=30 [block_sparsegpt]=60 [block_safe]=60 [block_safe_plus]=60)

failed=0
part() {  # part NAME ARGS...: run one benchmark module, log it, append to summary
  local name="$1" seconds=$((${limits[$1]:-${limits[${1%%_*}]}} * scale)); shift
  if [[ -n "$parts" && ",$parts," != *",$name,"* ]]; then return; fi
  echo "## $name" | tee -a "$summary"
  echo '```' >>"$summary"
  timeout "$seconds" "$python" -m "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -e '^I[0-9]' -e '^W[0-9]' -e 'libtpu' "$out/$name.log" | tee -a "$summary"
  echo '```' >>"$summary"
  if [[ $rc != 0 ]]; then
    failed=$((failed + 1))
    echo "FAILED ($([[ $rc == 124 ]] && echo "over ${seconds} s" || echo "exit $rc"))" \
      | tee -a "$summary"
  fi
}

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv,noheader
  "$python" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$summary"
start=$SECONDS
part projection safe_dist.bench.projection "${proj[@]}"
for model in "${models[@]}"; do
  part "step_$model" safe_dist.bench.step --model "$model" --methods dense,SAM,SAFE \
      "${step[@]}"
done
for method in "${block_methods[@]}"; do
  part "block_$method" safe_dist.bench.layerwise --methods "$method" "${block[@]}"
done
echo "total: $((SECONDS - start)) s, $failed failed part(s); logs in $out" | tee -a "$summary"
exit "$failed"
