"""launch/gpu_check.sh refuses before any work: unknown arguments, unknown --parts, a bad
--limit_scale, a non-empty --out, and a machine without a GPU (unless --dry_run). Its
--dry_run rehearsal on CPU is recorded in BUILD_NOTES.md (it compiles every benchmark:
minutes, too slow for the suite)."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "launch", "gpu_check.sh")


def run_script(*args):
  env = dict(os.environ, SAFE_PYTHON=sys.executable)
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env,
                        timeout=120)


def test_unknown_argument_is_refused():
  result = run_script("--gpus", "8")
  assert result.returncode == 2
  assert "unknown argument --gpus (allowed: --venv DIR, --wheels DIR, --out DIR" in result.stderr


def test_non_empty_out_is_refused_and_left_alone(tmp_path):
  (tmp_path / "keep.txt").write_text("mine")
  result = run_script("--out", str(tmp_path))
  assert result.returncode == 2 and "is not empty (nothing is overwritten)" in result.stderr
  assert os.listdir(tmp_path) == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "mine"


def test_a_machine_without_gpu_is_refused(tmp_path):
  result = run_script("--out", str(tmp_path / "check"))
  assert result.returncode == 2
  assert "JAX sees no GPU (platform 'cpu'" in result.stderr and "--dry_run" in result.stderr


def test_unknown_part_is_refused_with_the_allowed_names(tmp_path):
  result = run_script("--parts", "projection,step_ResNet20", "--out", str(tmp_path / "check"))
  assert result.returncode == 2
  assert "--parts: unknown part 'step_ResNet20' (allowed: projection step_ResNet20x2" in result.stderr
  assert "block_safe_plus)" in result.stderr and not (tmp_path / "check").exists()


def test_bad_limit_scale_is_refused(tmp_path):
  result = run_script("--limit_scale", "0.5", "--out", str(tmp_path / "check"))
  assert result.returncode == 2
  assert "--limit_scale must be a positive integer, got '0.5'" in result.stderr
  assert not (tmp_path / "check").exists()
