"""The language model through the trainer's command line: a `--debug` SAFE run of
config:lm_shakespeare_tiny learns (perplexity far below the uniform 256 of bytes) and ends at
exactly the target sparsity; `lm_eval` on its workdir reproduces the run's own perplexity; the
1B config's sharded state is reported per device without being allocated."""

import json
import re

import jax
import numpy as np
import pytest

import configs
import fiddle as fdl
from helpers import run_module
from safe_dist import run_setup
from safe_dist import workdir as workdir_lib
from safe_dist.checkpointing import Checkpointer
from trainer_helpers import read_scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lm") / "run"
  # Two of the four blocks: half the compile time, the same code paths.
  proc = run_module("safe_dist.train", ["--config", "config:lm_shakespeare_tiny", "--debug",
                                        "--config", "set:model.llama.num_hidden_layers=2",
                                        "--workdir", str(workdir)], cwd=workdir.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_debug_run_learns_and_ends_at_exact_sparsity(debug_run):
  workdir, proc = debug_run
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["task"] == "next_token" and summary["steps"] == 20
  assert summary["weight_sparsity"] == 0.5
  assert summary["perplexity_before_projection"] < 40  # bytes: uniform is 256, unigram ~30
  assert summary["perplexity"] < 40
  scalars = read_scalars(str(workdir / "tensorboard"))
  ppl = [v for _, v in scalars["val/perplexity"]]
  assert "val/masked_perplexity" in scalars and ppl[-1] < 40
  assert "perplexity (projected)" in proc.stdout
  # Each of the 2 x 7 kernels exactly half zero: the per-kernel (layerwise) target.
  exp = workdir_lib.stored_experiment(str(workdir))
  run = run_setup.setup(exp, info=run_setup.shapes_only_info(exp))
  checkpointer = Checkpointer(str(workdir / "checkpoints"))
  state = checkpointer.restore(checkpointer.latest_step(), run.abstract_state)
  checkpointer.close()
  kernels = [x for path, x in jax.tree_util.tree_flatten_with_path(
      jax.device_get(run.project(state.params)))[0] if "proj" in jax.tree_util.keystr(path)]
  assert len(kernels) == 14
  assert all(int((k == 0).sum()) == k.size // 2 for k in kernels)


def test_lm_eval_on_the_workdir_reproduces_the_run_perplexity(debug_run, tmp_path):
  workdir, _ = debug_run
  summary = json.loads((workdir / "summary.json").read_text())
  out = tmp_path / "ppl.json"
  # --debug evaluates the first 256 test windows of 64 bytes: the same windows here.
  proc = run_module("safe_dist.lm_eval", ["--model", str(workdir), "--seqlen", "64",
                                          "--max_windows", "256", "--batch_size", "32",
                                          "--mesh", "2,2,2", "--out", str(out)], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["windows"] == 256 and result["tokens"] == 256 * 63
  np.testing.assert_allclose(result["perplexity"], summary["perplexity"], rtol=1e-5)
  assert "hard-projected" in result["network"]


def test_image_evaluations_refuse_a_language_model_run(debug_run, tmp_path):
  workdir, _ = debug_run
  proc = run_module("safe_dist.eval", ["--workdir", str(workdir), "--mode", "corrupt"],
                    cwd=tmp_path)
  assert proc.returncode == 2 and "lm_eval" in proc.stderr, proc.stderr[-2000:]
  assert not (workdir / "eval_corrupt.json").exists()


def test_lm_eval_refuses_bad_flags_before_any_work(tmp_path):
  for args, flag in ((["--split", "dev"], "--split"), (["--mesh", "2x2"], "--mesh")):
    proc = run_module("safe_dist.lm_eval", ["--model", "smollm2-135m", *args], cwd=tmp_path)
    assert proc.returncode == 2 and flag in proc.stderr, proc.stderr[-2000:]


def _report_rows(stdout: str) -> dict:
  rows = {}
  for line in stdout.splitlines():
    m = re.match(r"(\w+)\s+([\d.]+) GiB\s+([\d.]+) GiB", line)
    if m:
      rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
  return rows


def test_memory_report_of_lm_1b_without_allocating(tmp_path):
  # Two of its 22 blocks: the same shardings per leaf, a tenth of the tracing.
  proc = run_module("safe_dist.train", ["--config", "config:lm_1b", "--memory_report",
                                        "--config", "set:model.llama.num_hidden_layers=2"],
                    cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "'fsdp': 8" in proc.stdout
  rows = _report_rows(proc.stdout)
  cfg = configs.lm_1b()
  cfg.model.llama.num_hidden_layers = 2
  llama = fdl.build(cfg).model.llama
  per_device, whole = rows["params"]
  assert whole == pytest.approx(llama.num_parameters() * 4 / 2**30, abs=1e-3)
  assert per_device == pytest.approx(whole / 8, abs=1e-3)  # fully sharded (norms aside)
  assert rows["optimizer"][1] == pytest.approx(2 * whole, abs=2e-3)  # AdamW's two moments
  # SAFE keeps a = x + u of every pruned kernel (all but the embedding) and a packed mask.
  assert rows["sparsifier"][0] == pytest.approx(rows["sparsifier"][1] / 8, abs=1e-3)
  assert not (tmp_path / "logdir").exists()  # nothing trained, nothing written
