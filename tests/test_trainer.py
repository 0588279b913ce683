"""End-to-end runs of the trainer on the debug config: outputs, sharding invariance, resume."""

import inspect
import json
import os

import jax
import numpy as np
import pytest

from safe_dist import checkpointing
from safe_dist import data
from safe_dist import evaluation
from safe_dist import run_setup
from safe_dist import sharding
from safe_dist import trainer
from safe_dist import workdir as workdir_lib
from safe_dist.checkpointing import Checkpointer
from safe_dist.sparsity import prunable_leaves, topk, weight_sparsity
from helpers import collectives
from trainer_helpers import debug_experiment, read_scalars, read_tags, replace

REQUIRED_TAGS = ("train/loss", "train/accuracy", "val/accuracy", "val/masked_accuracy",
                 "sparsity/z", "admm/constraint_gap", "admm/lambda", "optim/lr", "sharpness/sam",
                 "sparsity/projected_weights", "admm/dual_norm", "admm/mask_change",
                 "admm/dual_residual",
                 "sharpness/hessian_max_eig", "sharpness/hessian_trace",
                 "sharpness/hessian_max_eig_projected", "sharpness/hessian_trace_projected",
                 "perf/examples_per_sec", "perf/step_time")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  exp = debug_experiment()
  summary = trainer.train_and_evaluate(exp, workdir)
  return exp, workdir, summary


def test_run_leaves_summary_events_config_and_checkpoint(finished_run):
  exp, workdir, summary = finished_run
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk == summary
  assert (summary["model"], summary["dataset"], summary["sparsifier"]) == (
      "LeNet300-100", "synthetic", "safe")
  assert summary["steps"] == exp.train.max_steps == 24
  assert summary["weight_sparsity"] == pytest.approx(exp.sparsifier.sparsity, abs=1e-4)
  assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["eval_split"] == "test"
  assert workdir_lib.stored_experiment(workdir) == exp  # the run's one identity record
  scalars = read_scalars(os.path.join(workdir, "tensorboard"))
  for tag in REQUIRED_TAGS:
    assert tag in scalars, f"missing tag {tag}"
    assert all(np.isfinite(v) for _, v in scalars[tag]), tag
  other = read_tags(os.path.join(workdir, "tensorboard"))
  assert "sparsity/per_layer" in other["histograms"]
  assert any(t.startswith("sparsity/per_layer") for t in other["tensors"])  # the text table
  assert scalars["sparsity/projected_weights"][-1][1] == pytest.approx(0.95, abs=1e-4)
  assert max(v for _, v in scalars["sharpness/hessian_trace"]) > 0
  changes = [v for _, v in scalars["admm/mask_change"]]
  assert all(0 <= v <= 1 for v in changes) and max(changes) > 0
  lam = dict(scalars["admm/lambda"])
  assert lam[max(lam)] > lam[min(lam)] >= 0  # cosine penalty grows
  run = run_setup.setup(exp)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  assert checkpointer.latest_step() == 24
  state = checkpointer.restore(24, run.abstract_state)
  assert int(state.step) == 24
  projected = run.project(state.params)
  assert float(weight_sparsity(projected)) == pytest.approx(summary["weight_sparsity"])
  checkpointer.close()


def test_one_device_and_eight_devices_give_the_same_run(tmp_path):
  assert jax.device_count() == 8
  # The debug run's 24 steps: the eight-device programs are `finished_run`'s, compiled once.
  # The Hessian probes are off: their numbers are not compared here (test_sharpness.py
  # compares sharded and unsharded probes) and they would compile twice more.
  exp = debug_experiment(**{"train.bnt_sample_size": 0, "train.sharpness_every_epochs": 0})
  single = replace(exp, "mesh", data=1, num_devices=1)
  results = {}
  for name, e in (("one", single), ("eight", exp)):
    workdir = str(tmp_path / name)
    with jax.threefry_partitionable(True):  # the production default (conftest turns it off)
      summary = trainer.train_and_evaluate(e, workdir)
    results[name] = (summary, read_scalars(os.path.join(workdir, "tensorboard")))
  (s1, m1), (s8, m8) = results["one"], results["eight"]
  assert s1["val_accuracy"] == pytest.approx(s8["val_accuracy"], abs=1e-6)
  for tag in ("train/loss", "sharpness/sam", "admm/constraint_gap"):
    np.testing.assert_allclose([v for _, v in m1[tag]], [v for _, v in m8[tag]],
                               rtol=1e-4, atol=1e-5, err_msg=tag)


def test_workdir_of_another_experiment_is_refused_untouched(finished_run):
  _, workdir, _ = finished_run
  other = replace(debug_experiment(), "sparsifier", name="gmp")
  before = sorted(os.walk(workdir))
  with pytest.raises(ValueError, match="holds a different run"):
    trainer.train_and_evaluate(other, workdir)
  assert sorted(os.walk(workdir)) == before


def test_validation_split_run(tmp_path):
  """--validation_examples: the run's evaluations, in the loop, at the end and by the eval
  CLI (which rebuilds the run from the workdir), are on the held-out examples."""
  # The debug run's programs (`test_one_device_and_eight_devices_give_the_same_run`): its
  # first 1024 training examples of the 2048 - 300 left.
  exp = debug_experiment(**{"data.validation_examples": 300, "train.bnt_sample_size": 0,
                            "train.sharpness_every_epochs": 0})
  workdir = str(tmp_path)
  summary = trainer.train_and_evaluate(exp, workdir)
  assert summary["eval_split"] == "validation"
  run = run_setup.setup(workdir_lib.stored_experiment(workdir))
  _, state = checkpointing.restore_last(workdir, run.abstract_state, "no checkpoint")
  clean = evaluation.clean_eval(run, state)
  assert clean["eval_split"] == "validation"
  assert clean["projected"]["0.95"]["accuracy"] == pytest.approx(summary["val_accuracy"])
  assert clean["dense"]["accuracy"] == pytest.approx(summary["val_accuracy_before_projection"])
  images, labels = data.split_arrays("synthetic", "validation", None, 300)
  n = exp.data.max_eval_examples
  held_out = evaluation.evaluate_batches(run, state.params, state.batch_stats,
                                         evaluation.array_batches(run, images[:n], labels[:n]))
  assert clean["dense"] == pytest.approx(held_out)
  test = evaluation.evaluate(run, state.params, state.batch_stats, split="test")
  assert test["loss"] != pytest.approx(held_out["loss"])


def test_no_validation_examples_is_the_same_experiment_as_before_the_field():
  """A workdir written before --validation_examples existed holds the N = 0 experiment."""
  record = workdir_lib.experiment_record(debug_experiment())
  assert record.pop("data.validation_examples") == 0
  assert not workdir_lib.differences(record, workdir_lib.experiment_record(debug_experiment()))
  assert workdir_lib.differences(record, workdir_lib.experiment_record(
      debug_experiment(**{"data.validation_examples": 10}))) == ["data.validation_examples"]


def test_validation_examples_leaving_no_training_example_refused():
  with pytest.raises(ValueError, match="--validation_examples .* smaller than the 2048"):
    run_setup.setup(debug_experiment(**{"data.validation_examples": 2048}))


@pytest.mark.slow
def test_lenet5_run(tmp_path):
  """LeNet-5 trains and its conv kernels are pruned with the dense ones: 4 steps of IHT (the
  projection of every sparsifier; IHT's step has no SAM pass, it compiles in half the time
  of SAFE's), on one device (cheaper to compile, too)."""
  exp = replace(debug_experiment(**{"train.max_steps": 4, "train.sharpness_every_epochs": 0,
                                    "train.bnt_sample_size": 0}), "model", name="LeNet5")
  exp = replace(replace(exp, "mesh", data=1, num_devices=1), "sparsifier", name="iht")
  summary = trainer.train_and_evaluate(exp, str(tmp_path))
  assert summary["model"] == "LeNet5" and summary["steps"] == 4
  assert summary["weight_sparsity"] == pytest.approx(0.95, abs=1e-4)
  run = run_setup.setup(exp)
  _, state = checkpointing.restore_last(str(tmp_path), run.abstract_state, "no checkpoint")
  kernels = prunable_leaves(run.project(state.params))
  assert sorted(k.ndim for k in kernels) == [2, 2, 4, 4]
  conv_zeros = sum(int((k == 0).sum()) for k in kernels if k.ndim == 4)
  assert conv_zeros > 0.5 * sum(k.size for k in kernels if k.ndim == 4)


def test_batch_size_not_divisible_by_data_parallel_size():
  exp = debug_experiment(**{"train.batch_size": 30})
  with pytest.raises(ValueError, match="--batch_size 30 must be divisible"):
    run_setup.setup(exp)


def test_projection_in_the_trainer_gathers_no_weights():
  """With kernels split over fsdp, Proj_d compiles to small collectives only."""
  exp = replace(debug_experiment(), "mesh", data=2, fsdp=4)
  run = run_setup.setup(exp)
  split = [not s.is_fully_replicated for s in jax.tree.leaves(run.param_shardings)]
  assert sum(split) >= 3  # the LeNet kernels (and some biases) are sharded
  hlo = jax.jit(lambda p: run.projection.project_params(p),
                in_shardings=(run.param_shardings,), out_shardings=run.param_shardings).lower(
                    run.abstract_state.params).compile().as_text()
  # Per-round counts and the fixed-size key sample only; the kernels hold 266k weights.
  ops = collectives(hlo)
  bound = 8 * (topk._SAMPLE + 3)
  assert ops and all(op in ("all-gather", "all-reduce") and size <= bound for op, size in ops)
  assert sum(x.size for x in prunable_leaves(run.abstract_state.params)) > 50 * bound


def test_nm_run_ends_two_of_four(tmp_path):
  exp = replace(debug_experiment(**{"train.max_steps": 8, "train.sharpness_every_epochs": 0}),
                "sparsifier", name="safe_plus", scope="nm", n_m=(2, 4))
  summary = trainer.train_and_evaluate(exp, str(tmp_path))
  assert summary["target_sparsity"] == summary["weight_sparsity"] == 0.5


def test_report_on_real_runs(finished_run, tmp_path):
  from safe_dist import report
  _, workdir, summary = finished_run
  out = str(tmp_path / "report")
  report.write_report([workdir], out)
  for name in ("accuracy_vs_sparsity.png", "training_curves.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  assert f"{100 * summary['val_accuracy']:.2f}%" in text and "LeNet300-100" in text


def test_batch_norm_statistics_are_global_batch_statistics():
  """ResNet20 (BatchNorm): a train step on 8 data shards differs from the one-device step no
  more than reordering the examples on one device does (BN's backward pass cancels heavily,
  so float32 reordering noise is ~1% of the gradient; per-shard statistics would differ by
  ~10% of the statistics themselves)."""
  # Plain SGD steps (no sparsifier): the point is the statistics, and it compiles faster.
  exp = replace(replace(debug_experiment(**{"train.max_steps": 2}), "model", name="ResNet20"),
                "sparsifier", name="none")
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(size=(32, 28, 28, 1)).astype(np.float32),
           "label": np.arange(32, dtype=np.int32) % 10}
  permuted = {k: v[rng.permutation(32)] for k, v in batch.items()}

  one = run_setup.setup(replace(exp, "mesh", data=1, num_devices=1))
  eight = run_setup.setup(replace(exp, "mesh", data=8))
  # One initial state for both meshes, placed by each mesh's shardings: the same start by
  # construction, and the initialisation is compiled once.
  initial = jax.device_get(one.init(0))

  def one_step(run, b):
    state = jax.device_put(initial, run.state_shardings)  # a fresh copy: the step donates it
    state, metrics = run.train_step(state, sharding.global_batch(run.mesh, b))
    return jax.device_get((state.batch_stats, state.params, metrics["train/loss"]))

  reference, reordered, sharded = one_step(one, batch), one_step(one, permuted), one_step(
      eight, batch)
  assert sharded[2] == pytest.approx(reference[2], rel=1e-5)
  max_diff = lambda x, y: max(np.abs(a - b).max()
                              for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  bounds = []
  for part in (0, 1):  # batch statistics, parameters after the step
    bounds.append(3 * max_diff(reference[part], reordered[part]) + 1e-6)
    assert max_diff(reference[part], sharded[part]) <= bounds[part], part
  stats_scale = max(np.abs(x).max() for x in jax.tree.leaves(reference[0]))
  assert stats_scale > 100 * bounds[0]  # the bound is far below the statistics themselves


def _stop_inside(function_name: str):
  """A stop request that turns True while `function_name` is on the call stack."""
  return lambda: any(frame.function == function_name for frame in inspect.stack(0))


def test_default_budget_skips_a_measurement_that_costs_too_much(tmp_path, caplog):
  """With the default 5% share, a Hessian probe on a batch 16x the train batch (one product
  costs more than the budget) is skipped with a logged reason, before compiling."""
  exp = debug_experiment(**{"train.monitoring_share": 0.05, "train.sharpness_batch_size": 512,
                            "train.bnt_sample_size": 0})
  caplog.set_level("INFO")
  summary = trainer.train_and_evaluate(exp, str(tmp_path))
  assert summary["steps"] == 24
  skipped = [r.getMessage() for r in caplog.records if "skipped (one Hessian" in r.getMessage()]
  assert len(skipped) == 4, skipped  # x and Proj(x) at step 16 and at step 24 (the end)
  assert "(estimated)" in skipped[0]
  scalars = read_scalars(os.path.join(str(tmp_path), "tensorboard"))
  assert not any(tag.startswith("sharpness/hessian") for tag in scalars)


@pytest.mark.parametrize("phase", ["measure", "evaluate_batches", "finalize"])
def test_stop_during_a_long_phase_ends_it_and_keeps_the_checkpoint(tmp_path, phase):
  """A stop signal during the Hessian probe, an evaluation or the final phase ends the run
  at once with the last step checkpointed; the same command then finishes the run."""
  exp = debug_experiment(**{"train.bnt_sample_size": 0})  # 24 steps: `finished_run`'s programs
  workdir = str(tmp_path)
  # The debug config evaluates and measures every half epoch (16 steps), mid-run here; the
  # final phase comes after step 24. The in-loop checkpoint of step 16 comes after the
  # evaluation and the probe: a stop inside them must save step 16 itself.
  stopped_at = 24 if phase == "finalize" else 16
  out = trainer.train_and_evaluate(exp, workdir, stop_requested=_stop_inside(phase))
  assert out == {"interrupted_at_step": stopped_at}
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  assert checkpointer.latest_step() == stopped_at
  checkpointer.close()
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  summary = trainer.train_and_evaluate(exp, workdir)
  assert summary["steps"] == 24
