"""`python -m safe_dist.eval`: clean, corrupt and adversarial modes, their JSON, bad flags."""

import json
import os
import types

import numpy as np
import pytest

import trainer_helpers
from fake_datasets import write_cifar
from helpers import run_module

pytest.importorskip("imagecorruptions")

DEBUG = ["--config", "config:debug"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One finished debug run (LeNet on synthetic 28x28x1 data)."""
  from safe_dist import trainer
  directory = str(tmp_path_factory.mktemp("eval_run") / "run")
  trainer.train_and_evaluate(trainer_helpers.debug_experiment(), directory)
  return directory


def _eval(workdir, tmp_path, *args):
  return run_module("safe_dist.eval", [*DEBUG, "--workdir", workdir, *args], tmp_path)


def _report(workdir, mode):
  with open(os.path.join(workdir, f"eval_{mode}.json")) as f:
    return json.load(f)


def test_corrupt_mode_generated(workdir, tmp_path):
  cache = tmp_path / "corruption_cache"
  args = ("--mode", "corrupt", "--corrupt_max_examples", "32", "--corruptions",
          "gaussian_noise,fog", "--corrupt_intensity", "3", "--corrupt_cache_dir", str(cache))
  result = _eval(workdir, tmp_path, *args)
  assert result.returncode == 0, result.stderr[-3000:]
  report = _report(workdir, "corrupt")
  cached = sorted(cache.iterdir())
  assert [p.name.split("-")[0] for p in cached] == ["fog", "gaussian_noise"]
  inodes = [p.stat().st_ino for p in cached]
  # A second evaluation reads the kept sets (the files are not written again): same numbers.
  again = _eval(workdir, tmp_path, *args, "--eval_out", "eval_corrupt_again.json")
  assert again.returncode == 0, again.stderr[-3000:]
  assert [p.stat().st_ino for p in sorted(cache.iterdir())] == inodes
  with open(os.path.join(workdir, "eval_corrupt_again.json")) as f:
    assert json.load(f)["corruptions"] == report["corruptions"]
  assert report["mode"] == "corrupt" and report["intensity"] == 3
  assert "ImageNet-C style" in report["source"] and "CIFAR-10-C" not in report["source"]
  assert "ImageNet-C style" in result.stdout and "CIFAR-10-C" not in result.stdout
  assert set(report["corruptions"]) == {"gaussian_noise", "fog"}
  assert report["network"].startswith("hard-projected")
  assert report["weight_sparsity"] == pytest.approx(0.95, abs=1e-4)
  for row in [*report["corruptions"].values(), report["clean"]]:
    assert 0.0 <= row["accuracy"] <= 1.0 and row["num_examples"] == 32
  assert report["mean_accuracy"] == pytest.approx(
      np.mean([r["accuracy"] for r in report["corruptions"].values()]))
  assert "mean" in result.stdout and "fog" in result.stdout


def test_adversarial_mode(workdir, tmp_path):
  result = _eval(workdir, tmp_path, "--mode", "adversarial", "--attack_max_examples", "64",
                 "--attack_steps", "3", "--attack_bound", "0.1")
  assert result.returncode == 0, result.stderr[-3000:]
  report = _report(workdir, "adversarial")
  assert report["attack"] == {"method": "PGD", "norm": "linf", "steps": 3, "bound": 0.1,
                              "lr": pytest.approx(0.025), "seed": 1}
  assert report["num_examples"] == 64 and report["eval_split"] == "test"
  bnt = trainer_helpers.debug_experiment().train.bnt_sample_size
  assert report["settings"] == {"mode": "adversarial", "bnt_sample_size": bnt,
                                "attack_norm": "linf", "attack_steps": 3, "attack_bound": 0.1,
                                "attack_lr": pytest.approx(0.025), "attack_max_examples": 64}
  assert 0.0 <= report["robust_accuracy"] <= report["clean_accuracy"] <= 1.0
  # eps = 0.1 in linf is a strong attack on an MLP trained for 24 steps.
  assert report["robust_accuracy"] < report["clean_accuracy"]
  assert "robust" in result.stdout


def test_clean_mode_reads_the_run_from_the_workdir(workdir, tmp_path):
  """Only evaluation flags are needed: the run's experiment comes from the workdir."""
  result = run_module("safe_dist.eval", ["--workdir", workdir, "--mode", "clean",
                                         "--eval_sparsities", "0.5"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  report = _report(workdir, "clean")
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert report["eval_split"] == summary["eval_split"] == "test"
  assert "evaluated on the test split" in result.stdout
  assert report["projected"]["0.95"]["accuracy"] == pytest.approx(summary["val_accuracy"])
  assert report["projected"]["0.5"]["weight_sparsity"] == pytest.approx(0.5, abs=1e-4)
  assert report["dense"]["accuracy"] == pytest.approx(
      summary["val_accuracy_before_projection"])


@pytest.mark.parametrize("args,message", [
    (["--sp", "0.9"], "--sp 0.9 disagrees with the run in --workdir (0.95)"),
    (["--sparsifier", "gmp"], "--sparsifier gmp disagrees with the run"),
    (["--config", "config:debug", "--config", "set:train.max_steps=30"], "holds a different run"),
])
def test_training_flags_that_disagree_with_the_run_are_refused(workdir, tmp_path, args,
                                                                message):
  before = sorted(os.listdir(workdir))
  result = run_module("safe_dist.eval", ["--workdir", workdir, *args], tmp_path)
  assert result.returncode == 2
  assert message in result.stderr, result.stderr[-2000:]
  assert sorted(os.listdir(workdir)) == before


@pytest.mark.parametrize("args,message", [
    (["--mode", "robust"], "--mode must be one of clean, corrupt, adversarial"),
    (["--mode", "corrupt", "--corrupt_intensity", "6"],
     "--corrupt_intensity must be an integer in 1..5"),
    (["--mode", "adversarial", "--attack_norm", "l1"], "--attack_norm must be one of linf, l2"),
])
def test_invalid_flags_stop_before_any_work(workdir, tmp_path, args, message):
  before = sorted(os.listdir(workdir))
  result = _eval(workdir, tmp_path, *args)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert sorted(os.listdir(workdir)) == before


def test_results_of_other_settings_are_kept(workdir, tmp_path):
  """An evaluation whose file would replace one written with other settings stops before any
  work, names --eval_out and leaves the file as it was; under another name it runs."""
  from safe_dist import eval as eval_lib
  kept = os.path.join(workdir, "eval_pgd.json")
  with open(kept, "w") as f:
    json.dump({"robust_accuracy": 0.5, "settings": {"mode": "adversarial", "attack_steps": 9}}, f)
  before = open(kept).read()
  args = ["--mode", "adversarial", "--attack_steps", "1", "--attack_max_examples", "16"]
  refused = _eval(workdir, tmp_path, *args, "--eval_out", "eval_pgd.json")
  assert refused.returncode == 2
  assert "already holds eval_pgd.json" in refused.stderr and "--eval_out" in refused.stderr
  assert "attack_steps 9 (here 1)" in refused.stderr, refused.stderr[-2000:]
  assert open(kept).read() == before
  result = _eval(workdir, tmp_path, *args, "--eval_out", "eval_pgd_1step.json")
  assert result.returncode == 0, result.stderr[-3000:]
  written = _report(workdir, "pgd_1step")
  assert written["settings"]["attack_steps"] == 1 and written["num_examples"] == 16
  assert open(kept).read() == before
  # The same settings again replace the file; other ones, or a file without settings, do not.
  settings = written["settings"]
  path = os.path.join(workdir, "eval_pgd_1step.json")
  assert eval_lib.results_path(workdir, "eval_pgd_1step.json", settings) == path
  with pytest.raises(ValueError, match="attack_bound"):
    eval_lib.results_path(workdir, "eval_pgd_1step.json", {**settings, "attack_bound": 0.2})
  with open(os.path.join(tmp_path, "eval_old.json"), "w") as f:
    json.dump({"robust_accuracy": 0.5}, f)
  with pytest.raises(ValueError, match="without a record of its settings"):
    eval_lib.results_path(str(tmp_path), "eval_old.json", settings)
  for bad in ("../eval.json", "eval.txt", "sub/eval.json"):
    with pytest.raises(ValueError, match="--eval_out must be a file name ending in .json"):
      eval_lib.results_path(workdir, bad, settings)


def _flags(**overrides):
  values = dict(mode="clean", corruptions=["fog"], corrupt_intensity=3, corrupt_max_examples=0,
                corrupt_cache_dir="", attack_max_examples=0, attack_norm="linf", attack_steps=10,
                attack_bound=None, attack_lr=None)
  values.update(overrides)
  return types.SimpleNamespace(**values)


@pytest.mark.parametrize("overrides,message", [
    ({"mode": "robust"}, "--mode must be one of clean, corrupt, adversarial"),
    ({"corruptions": ["fog", "rain"]}, "--corruptions: unknown 'rain'; allowed: gaussian_noise"),
    ({"corruptions": []}, "--corruptions must name at least one of gaussian_noise"),
    ({"corrupt_intensity": 0}, "--corrupt_intensity must be an integer in 1..5"),
    ({"corrupt_max_examples": -1}, "--corrupt_max_examples must be >= 0"),
    ({"attack_max_examples": -5}, "--attack_max_examples must be >= 0"),
    ({"attack_norm": "l3"}, "--attack_norm must be one of linf, l2"),
    ({"attack_steps": 0}, "--attack_steps must be an integer >= 1"),
    ({"attack_bound": -1.0}, "--attack_bound must be a number > 0"),
    ({"attack_bound": float("nan")}, "--attack_bound must be a number > 0"),
    ({"attack_lr": 0.0}, "--attack_lr must be a number > 0"),
])
def test_check_flags_names_flag_and_allowed_values(overrides, message):
  from safe_dist import eval as eval_lib
  with pytest.raises(ValueError) as info:
    eval_lib.check_flags(_flags(**overrides))
  assert message in str(info.value)


def test_check_flags_refuses_a_file_as_cache_dir(tmp_path):
  from safe_dist import eval as eval_lib
  eval_lib.check_flags(_flags(corrupt_cache_dir=str(tmp_path / "not_yet")))
  (tmp_path / "file").write_text("kept")
  with pytest.raises(ValueError, match="--corrupt_cache_dir must be a folder"):
    eval_lib.check_flags(_flags(corrupt_cache_dir=str(tmp_path / "file")))
  assert (tmp_path / "file").read_text() == "kept"


def test_attack_defaults():
  from safe_dist import eval as eval_lib
  eval_lib.check_flags(_flags())
  assert eval_lib.attack_bound_and_lr(_flags()) == pytest.approx((1 / 255, 1 / 1020))
  assert eval_lib.attack_bound_and_lr(_flags(attack_norm="l2")) == pytest.approx(
      (3 / 255, 3 / 1020))
  assert eval_lib.attack_bound_and_lr(_flags(attack_bound=0.5, attack_lr=0.2)) == (0.5, 0.2)


@pytest.mark.filterwarnings("ignore")
def test_corrupt_eval_reads_real_cifar10c(tmp_path):
  """A cifar10 run uses CIFAR-10-C files where they exist (the given intensity's rows) and
  generates the rest, labelled as such."""
  from safe_dist import evaluation, run_setup
  root = str(tmp_path / "data")
  written = write_cifar(os.path.join(root, "cifar-10-batches-py"), "cifar10",
                        {"train": 40, "test": 30})
  test_images, test_labels = written["test"]
  # fog.npy: intensity 2 holds the clean test images; the other intensities are noise.
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, 256, test_images.shape, dtype=np.uint8) for _ in range(5)]
  rows[1] = test_images
  os.makedirs(os.path.join(root, "CIFAR-10-C"))
  np.save(os.path.join(root, "CIFAR-10-C", "fog.npy"), np.concatenate(rows))
  np.save(os.path.join(root, "CIFAR-10-C", "labels.npy"), np.tile(test_labels, 5))

  exp = trainer_helpers.debug_experiment(**{
      "data.name": "cifar10", "data.data_dir": root, "data.max_eval_examples": None,
      "train.eval_batch_size": 16})
  run = run_setup.setup(exp)
  state = run.init(0)
  network = evaluation.final_network(run, state)
  assert network.description["bn_recalibrated"] is False  # LeNet has no BatchNorm
  params, stats = network.params, network.batch_stats

  results = evaluation.corrupt_eval(run, network, ["fog", "gaussian_noise"], 2, max_examples=20)
  fog, noise = results["corruptions"]["fog"], results["corruptions"]["gaussian_noise"]
  assert fog["source"] == "CIFAR-10-C" and "ImageNet-C style" in noise["source"]
  assert results["source"].startswith("mixed")
  assert fog["num_examples"] == noise["num_examples"] == results["clean"]["num_examples"] == 20
  assert fog["accuracy"] == pytest.approx(results["clean"]["accuracy"])
  assert fog["loss"] == pytest.approx(results["clean"]["loss"], rel=1e-5)

  # The padded in-memory evaluation agrees with the trainer's over the whole test split.
  full = evaluation.evaluate_batches(run, params, stats,
                                     evaluation.array_batches(run, test_images, test_labels))
  reference = evaluation.evaluate(run, params, stats)
  assert full["num_examples"] == 30
  assert full["accuracy"] == pytest.approx(reference["accuracy"])
  assert full["loss"] == pytest.approx(reference["loss"], rel=1e-5)

  # The same dataset at intensity 3 reads other rows (noise), not the clean images.
  other = evaluation.corrupt_eval(run, network, ["fog"], 3, max_examples=20)
  assert other["source"] == "CIFAR-10-C"
  assert other["corruptions"]["fog"]["loss"] != pytest.approx(results["clean"]["loss"])
