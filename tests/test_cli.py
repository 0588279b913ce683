"""The command line: reference flags, fiddle overrides, and errors before any work."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, run_module
REFERENCE_COMMAND = ("--model VGG19-bn --dataset cifar10 --num_epochs 300 --sparsifier safe "
                     "--lambda 0.0001 --lambda_schedule cosine --rho 0.1 "
                     "--dual_update_interval 32 --sp .95 --seed 1").split()


@pytest.mark.parametrize("args,flag,allowed", [
    (["--sp", "1.5"], "--sp", "[0, 1)"),
    (["--model", "ResNet21"], "--model", "VGG19-bn"),
    (["--dataset", "imagenet"], "--dataset", "cifar100"),
    (["--sparsifier", "prune"], "--sparsifier", "magnitude"),
    (["--lambda_schedule", "step"], "--lambda_schedule", "cosine"),
    (["--batch_size", "30", "--dataset", "synthetic"], "--batch_size", "divisible"),
    (["--sam_group_size", "3", "--dataset", "synthetic"], "--sam_group_size 3",
     "allowed: 0, 1, 2, 4, 8, 16, 128"),
    (["--config", "config:nonexistent"], "nonexistent", ""),
    (["--validation_examples", "-1"], "--validation_examples", ">= 0"),
    (["--sparsifier", "gmp", "--penalty_pull", "10"], "--penalty_pull",
     "'safe', 'safe_plus', 'admm'"),
    (["--validation_examples", "2048", "--dataset", "synthetic"], "--validation_examples",
     "smaller than the 2048 examples of the training split"),
])
def test_invalid_input_stops_before_any_work(tmp_path, args, flag, allowed):
  workdir = tmp_path / "run"
  result = run_module("safe_dist.train", ["--workdir", str(workdir), *args], tmp_path)
  assert result.returncode != 0
  assert flag in result.stderr and allowed in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()


@pytest.mark.slow
def test_debug_cli_run_then_eval(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config", "config:debug", "--workdir", workdir, "--eval_sparsities", "0.5,0.9"]
  result = run_module("safe_dist.train", args, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "weight sparsity" in result.stdout and "tensorboard --logdir" in result.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert set(summary["masked_accuracy_at"]) == {"0.5", "0.9"}
  with open(os.path.join(workdir, "experiment.json")) as f:
    assert json.load(f)["model.name"] == "LeNet300-100"

  result = run_module("safe_dist.eval", args, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval_clean.json")) as f:
    report = json.load(f)
  assert report["step"] == summary["steps"]
  assert set(report["projected"]) == {"0.95", "0.5", "0.9"}
  assert report["projected"]["0.95"]["weight_sparsity"] == pytest.approx(0.95, abs=1e-4)
  assert report["projected"]["0.95"]["accuracy"] == pytest.approx(summary["val_accuracy"])


@pytest.mark.parametrize("config", [[], ["--config", "config:debug"]], ids=["bare", "config"])
def test_eval_without_a_run_says_so(tmp_path, config):
  result = run_module("safe_dist.eval", [*config, "--workdir", str(tmp_path / "none")], tmp_path)
  assert result.returncode == 2
  assert "holds no run" in result.stderr


def test_reference_flags_map_onto_the_config(tmp_path):
  """The seed README's command, parsed: every flag lands on its config field."""
  code = (
      "import sys; from absl import flags; from safe_dist import flags as run_flags;"
      "c = run_flags.define_flags(); argv = run_flags.with_default_config(sys.argv);"
      "flags.FLAGS(argv); e = run_flags.build_experiment(run_flags.resolved_config(c));"
      "print(e.model.name, e.data.name, e.train.num_epochs, e.sparsifier.name, e.sparsifier.lam,"
      " e.sparsifier.lambda_schedule, e.sparsifier.rho, e.sparsifier.dual_update_interval,"
      " e.sparsifier.sparsity, e.train.seed, e.train.batch_size, e.optimizer.lr)")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code, "--workdir=./logdir", *REFERENCE_COMMAND],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["VGG19-bn", "cifar10", "300.0", "safe", "0.0001", "cosine",
                                   "0.1", "32", "0.95", "1", "128", "0.1"]


def test_every_config_builds_and_every_fiddler_applies():
  import configs
  import fiddle as fdl
  from safe_dist import flags as run_flags
  assert {"reference", "debug", "fashion_mnist_lenet", "mnist_lenet", "fashion_mnist_lenet5",
          "mnist_lenet5"} <= set(run_flags.CONFIG_NAMES)
  assert {"debug_mode", "layerwise", "admm"} <= set(run_flags.FIDDLER_NAMES)
  for name in run_flags.CONFIG_NAMES:
    fdl.build(getattr(configs, name)())
  for name in run_flags.FIDDLER_NAMES:
    fdl.build(getattr(configs, name)(configs.reference()))
  for name, model, dataset in (("mnist_lenet", "LeNet300-100", "mnist"),
                               ("fashion_mnist_lenet5", "LeNet5", "fashion_mnist"),
                               ("mnist_lenet5", "LeNet5", "mnist")):
    exp = fdl.build(getattr(configs, name)())
    assert (exp.model.name, exp.data.name) == (model, dataset)
    assert exp.train == fdl.build(configs.fashion_mnist_lenet()).train


@pytest.mark.slow
def test_reference_command_runs_as_written_on_cifar10(tmp_path):
  """The seed README's command (python -m safe_dist.train for python train.py), on a tiny
  CIFAR-10 in the real pickle format, cut to two steps of 8 examples so that VGG19-bn fits a
  CPU test (the reference flags themselves, batch size 128 included, are checked above; a
  smaller batch changes no program but the batch dimension, and the 128-example steps alone
  took minutes on two CPU cores)."""
  from fake_datasets import write_cifar
  data_dir = tmp_path / "cifar"
  write_cifar(str(data_dir / "cifar-10-batches-py"), "cifar10", {"train": 52, "test": 40})
  result = run_module("safe_dist.train",
                ["--workdir=./logdir", *REFERENCE_COMMAND, "--data_dir", str(data_dir),
                 "--config", "set:train.max_steps=2", "--batch_size", "8",
                 "--bnt_sample_size", "16", "--sharpness_every", "0"],
                tmp_path, timeout=900, devices=1)  # one CPU device: VGG19 compiles faster
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "logdir" / "summary.json") as f:
    summary = json.load(f)
  assert (summary["model"], summary["dataset"], summary["sparsifier"]) == (
      "VGG19-bn", "cifar10", "safe")
  assert summary["steps"] == 2 and summary["weight_sparsity"] == pytest.approx(0.95, abs=1e-6)
  assert summary["bn_recalibrated"]
