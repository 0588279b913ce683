"""bench.lm_table: cells skipped when done, interrupted ones kept aside, the table's numbers.

The `prune_lm` runs themselves are tested in test_prune_lm.py; here a stand-in writes each
cell's summary so that only the table's own logic runs.
"""

import json
import os
import subprocess

import pytest

from safe_dist.bench import lm_table


def fake_prune_lm(calls):
  """subprocess.run stand-in: records the command and writes a summary like prune_lm's."""

  def run(command, check):
    assert check
    calls.append(command)
    arg = lambda name: command[command.index(name) + 1]
    os.makedirs(arg("--out"))
    summary = {"perplexity": 10.0 + len(calls), "seconds_per_block": 1.5 * len(calls),
               "dense_perplexity": None if "--skip_dense_eval" in command else 9.25}
    with open(os.path.join(arg("--out"), "summary.json"), "w") as f:
      json.dump(summary, f)
    return subprocess.CompletedProcess(command, 0)
  return run


def test_cells_run_once_and_interrupted_ones_are_moved_aside(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(subprocess, "run", fake_prune_lm(calls))
  out = str(tmp_path / "table")
  interrupted = lm_table.cell_dir(out, "wanda", "2:4")
  os.makedirs(interrupted)
  open(os.path.join(interrupted, "partial"), "w").close()
  argv = ["--out", out, "--methods", "magnitude,wanda", "--sparsity_types", "unstructured,2:4",
          "--", "--model", "m", "--nsamples", "4"]
  lm_table.main(argv)
  assert len(calls) == 4
  assert "--skip_dense_eval" not in calls[0] and all("--skip_dense_eval" in c for c in calls[1:])
  assert all(c[c.index("--model") + 1] == "m" for c in calls)
  assert [(c[c.index("--prune_method") + 1], c[c.index("--sparsity_type") + 1])
          for c in calls] == [("magnitude", "unstructured"), ("wanda", "unstructured"),
                              ("magnitude", "2:4"), ("wanda", "2:4")]
  assert os.path.exists(os.path.join(interrupted + ".interrupted-1", "partial"))
  table = capsys.readouterr().out.splitlines()[-4:]
  assert table[1] == "| dense | 9.25 | 9.25 | - | - |"
  # cell i (1-based, in run order) has perplexity 10 + i and 1.5 i seconds per block
  assert table[2] == "| magnitude | 11.00 | 13.00 | 1.5 | 4.5 |"
  assert table[3] == "| wanda | 12.00 | 14.00 | 3.0 | 6.0 |"

  lm_table.main(argv)  # everything done: nothing runs again, the same table
  assert len(calls) == 4
  assert capsys.readouterr().out.splitlines()[-4:] == table


@pytest.mark.parametrize("argv, message", [
    (["--methods", "safe,sgd"], "--methods: sgd not in"),
    (["--sparsity_types", "3:4"], "--sparsity_types: 3:4 not in"),
    (["--", "--prune_method=wanda"], "--prune_method is set per cell"),
    (["--", "--out", "x"], "--out is set per cell"),
])
def test_bad_flags_are_refused_before_any_run(tmp_path, monkeypatch, capsys, argv, message):
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a cell ran"))
  with pytest.raises(SystemExit):
    lm_table.main(["--out", str(tmp_path / "t"), *argv])
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "t")
