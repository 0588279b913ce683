"""safe_dist.sweep on a 2-cell grid (config:debug, SAFE, seeds 1 and 2): it runs both cells
and reports mean +- std over the seeds; run again it skips the finished cell and resumes the
interrupted one; bad grids are refused before any run; the sbatch command lines.

The sweep imports safe_dist.train (the train flags), which must not share a process with
other tests' flag definitions: every sweep here is its own process.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, run_module

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

GRID = ["--grid", "sparsifier=safe", "--seeds", "1,2"]
# The debug config's 24 steps (checkpoints at 8, 16, 24) without the Hessian probes and BN
# re-calibration. Label noise changes only the data (no program): the seeds then end apart.
COMMON = ["--config", "config:debug", "--sharpness_every", "0", "--bnt_sample_size", "0",
          "--label_noise_ratio", "0.8"]
CELLS = ("sparsifier-safe_seed-1", "sparsifier-safe_seed-2")


def _sweep(root, *args, common=COMMON) -> subprocess.CompletedProcess:
  # One CPU device for the cells: their programs compile and run fastest there.
  return run_module("safe_dist.sweep", ["--root", str(root), *GRID, *args, "--", *common],
                    REPO, devices=1)


def _summary(root, cell) -> dict:
  with open(os.path.join(root, cell, "summary.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep") / "grid"
  result = _sweep(root, "--parallel", "2")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return root, result


@pytest.mark.slow
def test_runs_every_cell_and_reports_mean_std_over_seeds(grid):
  root, result = grid
  assert "2 cell(s)" in result.stdout and "0 finished, 0 to resume, 2 new" in result.stdout
  for seed, cell in zip((1, 2), CELLS):
    with open(os.path.join(root, cell, "experiment.json")) as f:
      record = json.load(f)
    assert (record["sparsifier.name"], record["train.seed"]) == ("safe", seed)
    assert record["data.label_noise_ratio"] == 0.8
    assert _summary(root, cell)["steps"] == 24
  md = (root / "report" / "report.md").read_text()
  assert (root / "report" / "accuracy_vs_sparsity.png").stat().st_size > 10_000
  row = next(line for line in md.splitlines() if line.startswith("| safe | 95.00% | 2 (1, 2) |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  for column, key in ((3, "val_accuracy"), (4, "val_accuracy_before_projection"),
                      (5, "weight_sparsity")):
    values = np.array([_summary(root, c)[key] for c in CELLS])
    expected = f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}"
    assert cells[column] == expected, (key, row)


@pytest.mark.slow
def test_second_run_skips_the_finished_cell_and_resumes_the_interrupted_one(grid):
  root, _ = grid
  finished, interrupted = (root / c for c in CELLS)
  # Cell 2 as a run stopped after its checkpoint of step 8 leaves it.
  (interrupted / "summary.json").unlink()
  for step in ("16", "24"):
    shutil.rmtree(interrupted / "checkpoints" / step)
  # A finished run of another sweep into the same root: the report covers it too.
  other = root / "sparsifier-admm_seed-1"
  other.mkdir()
  for name in ("summary.json", "experiment.json"):
    shutil.copy(finished / name, other / name)
  untouched = {p: (p.stat().st_mtime_ns, p.stat().st_size)
               for p in (finished / "summary.json", finished / "train.log",
                         finished / "experiment.json")}
  result = _sweep(root, "--parallel", "2")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout
  assert "1 finished, 1 to resume, 0 new" in out, out
  assert f"skip {CELLS[0]}: finished" in out and f"start {CELLS[1]} (resuming)" in out, out
  assert f"start {CELLS[0]}" not in out
  assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in untouched} == untouched
  log = (interrupted / "train.log").read_text()
  assert "resumed from the checkpoint of step 8" in log, log[-3000:]
  assert _summary(root, CELLS[1])["steps"] == 24
  assert "report over 3 finished run(s) in" in out, out
  assert "2 of this grid's 2 cell(s), 1 from other sweeps" in out, out
  assert "sparsifier-admm_seed-1" in (root / "report" / "report.md").read_text()


# Each case: sweep.main(argv) in one process; prints [exit status, stdout, stderr] per case.
_DRIVER = """
import contextlib, io, json, os, sys
from safe_dist import sweep
results = []
for argv, env in json.loads(sys.argv[1]):
  os.environ.update(env)
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = sweep.main(argv)
    except SystemExit as e:
      code = e.code
  results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _sweep_cases(cases: list) -> list:
  """[(exit status, stdout, stderr)] of `sweep.main(argv)` for each (argv, env) in one process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_refusals_and_sbatch_commands(grid, tmp_path):
  """Bad keys, values, seeds and clashing flags stop the sweep (status 2, nothing created);
  so does a root whose cells hold another experiment. With --slurm each unfinished cell is
  one sbatch of train.sbatch; a cell whose job Slurm still lists is not submitted again."""
  root, _ = grid
  new = tmp_path / "new"
  bad = [
      (["--grid", "target_sparsity=0.9"], ["--grid target_sparsity: unknown key; allowed:",
                                           " sp,", "sparsifier", "config"]),
      (["--grid", "sparsifier=safe,prune"], ["--sparsifier must be one of", "magnitude",
                                             "got 'prune'"]),
      (["--grid", "sp=0.9,1.5"], ["--sp must be in [0, 1), got 1.5"]),
      (["--grid", "config=debug,nope"], ["--grid config=nope: unknown config; allowed:",
                                         "fashion_mnist_lenet"]),
      (["--grid", "seed=1,2"], ["--grid seed: the sweep sets it: use --seeds"]),
      (["--seeds", "1,x"], ["--seeds must be integers"]),
  ]
  cases = [(["--root", str(new), *args, "--", *COMMON], {}) for args, _ in bad]
  cases.append((["--root", str(new), *GRID, "--", *COMMON, "--seed", "3"], {}))
  cases.append((["--root", str(root), *GRID, "--", *COMMON, "--lr", "0.05"], {}))

  # Fake Slurm clients: sbatch logs its arguments and answers job ids 1, 2, ...; squeue lists
  # the ids in $FAKE_QUEUE.
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  sbatch_log = tmp_path / "sbatch.log"
  (fake_bin / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {sbatch_log}\n'
                                   f'wc -l < {sbatch_log}\n')
  (fake_bin / "squeue").write_text('#!/bin/sh\nfor j in $FAKE_QUEUE; do echo "$j"; done\n')
  for tool in ("sbatch", "squeue"):
    (fake_bin / tool).chmod(0o755)
  slurm_root = tmp_path / "slurm"
  slurm = ["--root", str(slurm_root), *GRID, "--slurm", "--sbatch_args=-N 1 --time=10", "--",
           *COMMON]
  queue = lambda jobs: {"PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_QUEUE": jobs}
  cases += [(slurm, queue("")),  # both submitted: jobs 1 and 2
            (slurm, queue("1")),  # job 1 queued, job 2 gone: cell 2 again, as job 3
            (["--dry_run", *slurm], queue("3"))]  # prints cell 1's command only
  results = _sweep_cases(cases)

  for (args, expected), (code, _, err) in zip(bad, results):
    assert code == 2, (args, err)
    for text in expected:
      assert text in err, (args, text, err)
  assert not new.exists()
  code, _, err = results[len(bad)]
  assert code == 2 and "--seed after -- is set by the sweep" in err, err
  code, _, err = results[len(bad) + 1]
  assert code == 2 and "holds a different run" in err and "optimizer.lr" in err, err

  code, out, err = results[len(bad) + 2]
  assert code == 0, err
  expected = []
  for cell, seed in zip(CELLS, (1, 2)):
    workdir = slurm_root / cell
    expected.append(
        f"--parsable --job-name={cell} --output={workdir}/slurm-%j.out -N 1 --time=10 "
        f"launch/slurm/train.sbatch {' '.join(COMMON)} --sparsifier=safe --seed={seed} "
        f"--workdir={workdir}")
  assert "no finished cell yet" in out
  code, out, err = results[len(bad) + 3]
  assert code == 0, err
  assert f"skip {CELLS[0]}: job 1 is queued or running" in out, out
  assert sbatch_log.read_text().splitlines() == expected + expected[1:]
  assert [(slurm_root / c / "slurm_job").read_text().strip() for c in CELLS] == ["1", "3"]
  code, out, err = results[len(bad) + 4]
  assert code == 0, err
  assert [line for line in out.splitlines() if not line.startswith("[sweep")] == [
      "sbatch " + expected[0]]
  assert len(sbatch_log.read_text().splitlines()) == 3


def test_report_groups_runs_that_differ_only_by_seed(tmp_path):
  """Three seeds of one lambda, two of another, one run without experiment.json: three
  groups, lambda as the setting column, mean ± std (ddof=1) as numpy computes them."""
  import configs
  import fiddle as fdl
  from safe_dist import report, workdir
  base = workdir.experiment_record(fdl.build(configs.debug()))
  accuracies = {(1e-3, 1): 0.91, (1e-3, 2): 0.87, (1e-3, 3): 0.9, (1e-2, 1): 0.8,
                (1e-2, 2): 0.85}
  workdirs = []
  for (lam, seed), accuracy in accuracies.items():
    run = tmp_path / f"lam{lam}_seed{seed}"
    run.mkdir()
    (run / "experiment.json").write_text(json.dumps(
        {**base, "sparsifier.lam": lam, "train.seed": seed}))
    (run / "summary.json").write_text(json.dumps(
        {"sparsifier": "safe", "target_sparsity": 0.95, "val_accuracy": accuracy,
         "val_accuracy_before_projection": accuracy + 0.01, "weight_sparsity": 0.95}))
    workdirs.append(str(run))
  lone = tmp_path / "no_record"
  lone.mkdir()
  (lone / "summary.json").write_text(json.dumps(
      {"sparsifier": "safe", "target_sparsity": 0.95, "val_accuracy": 0.5}))
  runs = [report.load_run(w, os.path.basename(w)) for w in workdirs + [str(lone)]]
  groups = report.seed_groups(runs)
  assert [len(g.runs) for g in groups] == [3, 2, 1]
  assert [g.setting for g in groups] == [{"sparsifier.lam": 1e-3}, {"sparsifier.lam": 1e-2},
                                         {"sparsifier.lam": None}]
  md = open(report.write_report(workdirs + [str(lone)], str(tmp_path / "out"))).read()
  for lam, seeds in ((1e-3, (1, 2, 3)), (1e-2, (1, 2))):
    after = 100 * np.array([accuracies[lam, s] for s in seeds])
    before = 100 * np.array([accuracies[lam, s] + 0.01 for s in seeds])
    row = (f"| safe | 95.00% | {lam} | {len(seeds)} ({', '.join(map(str, seeds))}) | "
           f"{after.mean():.2f} ± {after.std(ddof=1):.2f} | "
           f"{before.mean():.2f} ± {before.std(ddof=1):.2f} | 95.00 ± 0.00 |")
    assert row in md, (row, md)
  assert "| safe | 95.00% | None | 1 (?) | 50.00 | - | - |" in md, md
  assert (tmp_path / "out" / report.ACCURACY_PNG).exists()


# run_local with stand-in cells that wait for SIGTERM and exit as a checkpointed run does.
_STOP_DRIVER = """
import json, os, signal, sys, threading
from safe_dist import sweep
cell_code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(%d)); time.sleep(60)"
sweep.train_command = lambda cell: [sys.executable, "-c", cell_code % sweep.REQUEUE_EXIT_CODE]
root = sys.argv[1]
cells = [sweep.Cell(f"cell-{i}", os.path.join(root, f"cell-{i}"), ()) for i in range(3)]
threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
print(json.dumps(sweep.run_local(cells, parallel=1)))
"""


def test_a_stop_signal_ends_the_sweep_with_cells_still_waiting(tmp_path):
  """SIGTERM while one of three cells runs: that cell is stopped (its checkpoint exit) and the
  sweep returns without starting the other two (it used to wait for them forever)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", _STOP_DRIVER, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1]) == {"cell-0": 85}
  assert sorted(os.listdir(tmp_path)) == ["cell-0"]


_TUNING_DRIVER = """
import json, os, sys
from safe_dist import sweep, workdir
root, common, runs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for grid, seed, accuracy in runs:
  (cell,) = sweep.make_cells(root, [(k, [v]) for k, v in grid], [seed], common)
  os.makedirs(cell.workdir)
  with open(os.path.join(cell.workdir, 'experiment.json'), 'w') as f:
    json.dump(workdir.experiment_record(sweep.cell_experiment(cell)), f)
  with open(os.path.join(cell.workdir, 'summary.json'), 'w') as f:
    json.dump({'model': 'LeNet300-100', 'dataset': 'synthetic', 'sparsifier': grid[0][1],
               'target_sparsity': 0.95, 'val_accuracy': accuracy, 'eval_split': 'validation'}, f)
"""


@pytest.mark.slow
def test_best_of_runs_each_methods_best_validation_setting(tmp_path):
  """--best_of: per method, the setting with the best mean validation accuracy over its seeds
  (numpy's argmax on fresh random accuracies, the first on a tie), as a cell per seed that
  rebuilds the tuning run but for the seed and --validation_examples; other flags after --,
  or --grid beside it, are refused before any run."""
  rng = np.random.default_rng()
  knobs = {"safe": ("sparsifier.rho", [0.02, 0.05, 0.1]),
           "gmp": ("sparsifier.end_fraction", [0.5, 0.75, 0.9])}
  runs, best = [], {}
  for method, (knob, values) in knobs.items():
    acc = rng.integers(0, 3, size=(len(values), 2)) / 100 + 0.8  # ties are likely
    if method == "gmp":
      acc[2] = acc[0] = acc.max() + 0.01  # a tie at the top: the first setting wins
    for i, value in enumerate(values):
      runs += [([("sparsifier", method), (knob, value)], seed, float(acc[i, seed - 1]))
               for seed in (1, 2)]
    best[method] = (knob, values[int(np.argmax(acc.mean(axis=1)))])
  tune = tmp_path / "tune"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  made = subprocess.run([sys.executable, "-c", _TUNING_DRIVER, str(tune),
                         json.dumps([*COMMON, "--validation_examples", "256"]), json.dumps(runs)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert made.returncode == 0, made.stderr[-3000:]
  out = tmp_path / "tuned"
  cases = [(["--root", str(out), "--best_of", str(tune), "--seeds", "1,2,3", "--dry_run", "--",
             *COMMON], {}),
           (["--root", str(out), "--best_of", str(tune), "--dry_run", "--", *COMMON,
             "--lr", "0.3"], {}),
           (["--root", str(out), "--best_of", str(tune), "--grid", "sp=0.9", "--", *COMMON], {}),
           (["--root", str(out), "--best_of", str(tmp_path / "none"), "--", *COMMON], {})]
  (code, stdout, err), *refused = _sweep_cases(cases)
  assert code == 0, err
  commands = [line for line in stdout.splitlines() if not line.startswith("[sweep")]
  assert len(commands) == 2 * 3
  for method, (knob, value) in best.items():
    for seed in (1, 2, 3):
      (command,) = [c for c in commands if f"--sparsifier={method} " in c and
                    f"--seed={seed} " in c]
      assert f"--config=set:{knob}={value} " in command, (method, command)
      assert "--validation_examples" not in command and "--sp=0.95 " in command
  for (code, _, err), text in zip(refused, ["optimizer.lr: 0.1 there, 0.3 here",
                                            "--best_of chooses each cell's setting",
                                            "is not a directory"]):
    assert code == 2 and text in err, err
  assert not out.exists()
