"""The report over two fake runs: real event files, summary.json, PNGs and markdown."""

import json
import os

import numpy as np
import pytest
from tensorboardX import SummaryWriter

from safe_dist import report

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(workdir, sparsifier, sparsity, accuracy, admm=True, steps=50, eval_split="test"):
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  for step in range(0, steps + 1, 10):
    values = {"train/loss": 2.0 * np.exp(-step / 20) + 0.1,
              "val/masked_accuracy": accuracy * (1 - np.exp(-step / 15)),
              "sharpness/sam": 0.05 / (1 + step)}
    if admm:
      values.update({"admm/constraint_gap": 1.0 / (1 + step), "admm/lambda": 1e-3 * step})
    for tag, value in values.items():
      writer.add_scalar(tag, value, global_step=step)
  writer.close()
  summary = {"model": "ResNet20", "dataset": "cifar10", "sparsifier": sparsifier,
             "target_sparsity": sparsity, "weight_sparsity": sparsity + 0.0012,
             "val_accuracy": accuracy, "val_loss": 0.5, "steps": steps,
             "masked_accuracy_at": {"0.9": accuracy}, "eval_split": eval_split}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_MAGIC
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_report_two_runs(tmp_path, capsys):
  safe, gmp = str(tmp_path / "safe_90"), str(tmp_path / "gmp_95")
  _fake_run(safe, "safe", 0.9, 0.9123, eval_split="validation")
  _fake_run(gmp, "gmp", 0.95, 0.8765, admm=False, steps=40)
  assert report.main([safe, gmp]) == 0
  out = os.path.join(safe, "report")
  for name in (report.ACCURACY_PNG, report.CURVES_PNG):
    width, height = _png_size(os.path.join(out, name))
    assert 400 <= width <= 3000 and 300 <= height <= 3000, (name, width, height)
    assert os.path.getsize(os.path.join(out, name)) > 10_000
  md = open(os.path.join(out, report.REPORT_MD)).read()
  for text in ["safe_90", "gmp_95", "91.23%", "87.65%", "90.00%", "95.00%", "90.12%", "95.12%",
               "| 50 |", "| 40 |", "ResNet20", "cifar10",
               f"]({report.ACCURACY_PNG})", f"]({report.CURVES_PNG})"]:
    assert text in md, text
  assert "91.23% (validation)" in md and "87.65% |" in md  # which split each accuracy is of
  assert f"Runs: the folders of `{tmp_path}`." in md  # one folder holds both
  # Running again replaces its own files and says so.
  capsys.readouterr()
  report.main([safe, gmp, "--out", out])
  assert "replacing" in capsys.readouterr().out


def test_runs_of_several_folders_are_each_located(tmp_path):
  first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
  runs = [report.Run(name, str(w), {}, {}, {}) for name, w in
          zip(report.run_names([str(first), str(second)]), (first, second))]
  assert report.run_locations(runs) == f"Runs: `run` = `{first}`, `run-2` = `{second}`."
  assert report.run_locations(runs[:1]) == f"Runs: the folders of `{tmp_path / 'a'}`."


def test_scalars_and_missing_tags(tmp_path):
  run = str(tmp_path / "r")
  _fake_run(run, "gmp", 0.5, 0.5, admm=False, steps=30)
  scalars = report.load_scalars(run)
  steps, values = scalars["train/loss"]
  np.testing.assert_array_equal(steps, [0, 10, 20, 30])
  np.testing.assert_allclose(values[0], 2.1, rtol=1e-6)
  assert "admm/lambda" not in scalars
  out = str(tmp_path / "out")
  report.write_report([run], out)
  assert sorted(os.listdir(out)) == sorted(
      [report.ACCURACY_PNG, report.CURVES_PNG, report.REPORT_MD])


def test_run_without_summary_and_bad_workdir(tmp_path):
  run = str(tmp_path / "curves_only")
  writer = SummaryWriter(os.path.join(run, "tb"))
  writer.add_scalar("train/loss", 1.0, 0)
  writer.close()
  path = report.write_report([run], str(tmp_path / "out"))
  md = open(path).read()
  assert "curves_only" in md and report.ACCURACY_PNG not in md and report.CURVES_PNG in md
  with pytest.raises(FileNotFoundError):
    report.write_report([str(tmp_path / "missing")])


@pytest.mark.parametrize("splits,label", [
    (["test", "test"], "final test accuracy (%)"),
    (["validation"], "final validation accuracy (%)"),
    (["test", "validation"], "final accuracy (%)"),
    ([None], "final accuracy (%)"),
])
def test_accuracy_axis_names_the_split_the_runs_were_evaluated_on(splits, label):
  summaries = [{} if s is None else {"eval_split": s} for s in splits]
  assert report.accuracy_axis_label(summaries) == label


def _tuning_run(root, name, record, summary):
  run = root / name
  run.mkdir(exist_ok=True)
  (run / "experiment.json").write_text(json.dumps(record))
  (run / "summary.json").write_text(json.dumps(summary))
  return str(run)


def test_best_setting_per_method_is_read_off_validation_runs_only(tmp_path):
  """Fresh random accuracies with ties: each method's best setting is numpy's argmax over the
  mean of its seeds (the first setting on a tie); test-split runs and a method with one setting
  take no part; `--root` reports every finished run in the folder."""
  from safe_dist import workdir
  from safe_dist.experiment import Experiment
  rng = np.random.default_rng()
  base = workdir.experiment_record(Experiment())
  # method -> the knob it is tuned over and its values
  knobs = {"safe": ("sparsifier.rho", [0.02, 0.05, 0.1]),
           "gmp": ("sparsifier.end_fraction", [0.5, 0.75, 0.9, 0.95])}
  expected = {}
  for method, (knob, values) in knobs.items():
    # Accuracies on a coarse grid so that ties between settings are likely.
    acc = rng.integers(0, 3, size=(len(values), 2)) / 100 + 0.8
    if method == "gmp":
      acc[1], acc[3] = acc[3] + 0.01, acc[3] + 0.01  # a tie at the top: the first one wins
    for i, value in enumerate(values):
      for seed in (1, 2):
        _tuning_run(tmp_path, f"{method}_{i}_seed{seed}",  # by name: in order
                    {**base, "sparsifier.name": method, knob: value, "train.seed": seed,
                     "data.validation_examples": 5000},
                    {"model": "LeNet300-100", "dataset": "mnist", "sparsifier": method,
                     "target_sparsity": 0.95, "val_accuracy": float(acc[i, seed - 1]),
                     "eval_split": "validation"})
    means = acc.mean(axis=1)
    expected[method] = (knob, values[int(np.argmax(means))], means.max(), means.min(),
                        acc[int(np.argmax(means))])
  # A better setting on the test split, and a method tried once: neither is selected.
  _tuning_run(tmp_path, "safe_test_split", {**base, "sparsifier.name": "safe",
                                            "sparsifier.rho": 0.3},
              {"model": "LeNet300-100", "dataset": "mnist", "sparsifier": "safe",
               "target_sparsity": 0.95, "val_accuracy": 0.99, "eval_split": "test"})
  _tuning_run(tmp_path, "iht_once", {**base, "sparsifier.name": "iht",
                                     "data.validation_examples": 5000},
              {"model": "LeNet300-100", "dataset": "mnist", "sparsifier": "iht",
               "target_sparsity": 0.95, "val_accuracy": 0.97, "eval_split": "validation"})
  runs = [report.load_run(w, os.path.basename(w)) for w in report.finished_workdirs(tmp_path)]
  selections = report.best_settings(report.seed_groups(runs))
  assert sorted(s.task[2] for s in selections) == ["gmp", "safe"]
  for sel in selections:
    knob, value, best, worst, seeds = expected[sel.task[2]]
    assert sel.knobs == (knob,)
    assert sel.best.runs[0].experiment[knob] == value
    np.testing.assert_allclose(sel.best.mean_std("val_accuracy")[0], best)
    np.testing.assert_allclose(sel.ranked[-1].mean_std("val_accuracy")[0], worst)
    assert sorted(r.summary["val_accuracy"] for r in sel.best.runs) == sorted(seeds)
  assert report.main(["--root", str(tmp_path)]) == 0
  md = (tmp_path / "report" / report.REPORT_MD).read_text()
  assert "safe_test_split" in md and "iht_once" in md  # every finished run is reported
  for method, (knob, value, best, worst, seeds) in expected.items():
    std = np.std(100 * seeds, ddof=1)
    row = (f"| LeNet300-100 | mnist | {method} | 95.00% | {len(knobs[method][1])} "
           f"| `{knob}={value}` | {100 * best:.2f} ± {std:.2f} |")
    assert row in md, (row, md)


def test_accuracy_series_name_each_method_by_its_own_knobs(tmp_path):
  """A tuning root: each method's lines are told apart by the fields in which its own runs
  differ (not another method's knobs), and each point is the float64 mean and std (ddof 1) of
  its seeds; the plot gets one panel per method."""
  from safe_dist import workdir
  from safe_dist.experiment import Experiment
  rng = np.random.default_rng()
  base = workdir.experiment_record(Experiment())
  knobs = {"admm": ("sparsifier.lam", [0.01, 0.02]),
           "gmp": ("sparsifier.end_fraction", [0.5, 0.75, 0.9])}
  expected = {}
  for method, (knob, values) in knobs.items():
    for value in values:
      for sparsity in (0.9, 0.99):
        acc = rng.uniform(0.7, 0.99, size=3)
        for seed in (1, 2, 3):
          _tuning_run(tmp_path, f"{method}_{value}_{sparsity}_seed{seed}",
                      {**base, "sparsifier.name": method, "sparsifier.sparsity": sparsity,
                       knob: value, "train.seed": seed},
                      {"model": "LeNet300-100", "dataset": "mnist", "sparsifier": method,
                       "target_sparsity": sparsity, "val_accuracy": float(acc[seed - 1])})
        label = f"{knob.removeprefix('sparsifier.')}={value}"
        expected.setdefault(method, {}).setdefault(label, []).append(
            (100 * sparsity, 100 * acc.mean(), 100 * acc.std(ddof=1)))
  runs = [report.load_run(w, os.path.basename(w)) for w in report.finished_workdirs(tmp_path)]
  series = report.accuracy_series(report.seed_groups(runs))
  assert series.keys() == expected.keys()
  for method, lines in expected.items():
    assert series[method].keys() == lines.keys()
    for label, points in lines.items():
      np.testing.assert_allclose(series[method][label], sorted(points), rtol=1e-12)
  path = str(tmp_path / "acc.png")
  assert report.plot_accuracy_vs_sparsity(report.seed_groups(runs), path)
  width, height = _png_size(path)
  assert width > 2 * height  # two panels side by side (one plot: 4:3)


@pytest.mark.parametrize("count", [report.MAX_CURVE_RUNS, report.MAX_CURVE_RUNS + 1])
def test_training_curves_of_many_runs_are_colored_by_sparsifier(count):
  methods = ["safe", "admm", "gmp"]
  runs = [report.Run(f"run{i}", "", {"sparsifier": methods[i % 3]}, {}, {}) for i in range(count)]
  keys, title = report.curve_keys(runs)
  if count <= report.MAX_CURVE_RUNS:
    assert (keys, title) == ([r.name for r in runs], "run")
  else:
    assert keys == [methods[i % 3] for i in range(count)]
    assert title == f"sparsifier ({count} runs)"


def test_group_table_has_the_final_networks_sharpness(tmp_path):
  """The Hessian columns are the float64 mean and std of each seed's value at its last step;
  a run whose last measurement is older than its last step contributes none."""
  from safe_dist import workdir
  from safe_dist.experiment import Experiment
  rng = np.random.default_rng()
  base = workdir.experiment_record(Experiment())
  eigs, traces = rng.uniform(1, 60, size=3), rng.uniform(10, 500, size=3)
  workdirs = []
  for seed in (1, 2, 3, 4):
    run = tmp_path / f"safe_seed{seed}"
    writer = SummaryWriter(str(run / "tensorboard"))
    last = 100 if seed < 4 else 90  # seed 4: no measurement at its last step
    for step, scale in ((50, 2.0), (last, 1.0)):
      i = min(seed, 3) - 1
      writer.add_scalar("sharpness/hessian_max_eig_projected", scale * eigs[i], step)
      writer.add_scalar("sharpness/hessian_trace_projected", scale * traces[i], step)
    writer.close()
    _tuning_run(tmp_path, run.name, {**base, "train.seed": seed},
                {"sparsifier": "safe", "target_sparsity": 0.9, "val_accuracy": 0.9, "steps": 100})
    workdirs.append(str(run))
  runs = [report.load_run(w, os.path.basename(w)) for w in workdirs]
  (group,) = report.seed_groups(runs)
  for tag, values in (("sharpness/hessian_max_eig_projected", eigs),
                      ("sharpness/hessian_trace_projected", traces)):
    # The reference is the float64 statistics of what TensorBoard stores (float32): close
    # draws make the std of the unrounded values differ from it by more than float32's eps.
    stored = values.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(group.mean_std(tag), (stored.mean(), stored.std(ddof=1)),
                               rtol=1e-12)
  table = "\n".join(report.group_table([group]))
  assert "top Hessian eigenvalue, final network" in table
  assert report.mean_std_text(*group.mean_std("sharpness/hessian_trace_projected"), False) in table
  # Without any measurement the columns are left out.
  bare = report.SeedGroup([r._replace(scalars={}) for r in runs], {})
  assert "Hessian" not in "\n".join(report.group_table([bare]))


def test_robustness_evaluations_join_the_group_table(tmp_path, capsys):
  """safe_dist.eval's files, whatever their names, become columns: the float64 mean and std of
  the seeds that have them, with the count where some lack one; a copy is read once."""
  from safe_dist import workdir
  from safe_dist.experiment import Experiment
  rng = np.random.default_rng()
  base = workdir.experiment_record(Experiment())
  robust, corrupt = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=2)
  runs = []
  for seed in (1, 2, 3):
    w = _tuning_run(tmp_path, f"seed{seed}", {**base, "train.seed": seed},
                    {"sparsifier": "safe", "target_sparsity": 0.99, "val_accuracy": 0.9})
    adversarial = {"mode": "adversarial", "robust_accuracy": robust[seed - 1],
                   "attack": {"norm": "linf", "bound": 0.1, "steps": 10, "lr": 0.025}}
    for name in ("eval_adversarial.json", "eval_adversarial_linf_0.1.json"):  # a copy
      (tmp_path / f"seed{seed}" / name).write_text(json.dumps(adversarial))
    if seed < 3:
      (tmp_path / f"seed{seed}" / "eval_corrupt.json").write_text(json.dumps(
          {"mode": "corrupt", "intensity": 3, "mean_accuracy": corrupt[seed - 1]}))
    (tmp_path / f"seed{seed}" / "eval_clean.json").write_text(json.dumps({"mode": "clean"}))
    runs.append(report.load_run(w, f"seed{seed}"))
  (group,) = report.seed_groups(runs)
  table = "\n".join(report.group_table([group]))
  for column, values, suffix in (("PGD linf 0.1, 10 steps (%)", robust, ""),
                                 ("corruptions, intensity 3 (%)", corrupt, " (2 of 3)")):
    np.testing.assert_allclose(group.mean_std(column), (values.mean(), values.std(ddof=1)))
    assert column in table
    assert report.mean_std_text(values.mean(), values.std(ddof=1)) + suffix + " |" in table
  # Another file for one column: the later checkpoint's wins; one of the same checkpoint that
  # disagrees is reported, and the first by name kept.
  attack = {"norm": "linf", "bound": 0.1, "steps": 10, "lr": 0.025}
  column = "PGD linf 0.1, 10 steps (%)"
  for name, step, value in (("eval_a_older.json", 5, 0.01), ("eval_z_later.json", 7, 0.02)):
    (tmp_path / "seed1" / name).write_text(json.dumps(
        {"mode": "adversarial", "robust_accuracy": value, "attack": attack, "step": step}))
  assert report.eval_results(str(tmp_path / "seed1"))[column] == 0.02
  (tmp_path / "seed1" / "eval_zz_same_step.json").write_text(json.dumps(
      {"mode": "adversarial", "robust_accuracy": 0.03, "attack": attack, "step": 7}))
  assert report.eval_results(str(tmp_path / "seed1"))[column] == 0.02
  assert "different values at step 7" in capsys.readouterr().err


def test_root_flag_is_checked(tmp_path, capsys):
  for argv, message in (([], "either WORKDIRs or --root"),
                        (["--root", str(tmp_path), str(tmp_path)], "either WORKDIRs or --root"),
                        (["--root", str(tmp_path / "missing")], "is not a directory"),
                        (["--root", str(tmp_path)], "holds no finished run")):
    with pytest.raises(SystemExit):
      report.main(argv)
    assert message in capsys.readouterr().err
  assert not (tmp_path / "report").exists()
