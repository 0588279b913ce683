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
  # Running again replaces its own files and says so.
  capsys.readouterr()
  report.main([safe, gmp, "--out", out])
  assert "replacing" in capsys.readouterr().out


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
