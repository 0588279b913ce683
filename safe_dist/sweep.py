"""`python -m safe_dist.sweep` (console script `safe-sweep`): a grid of experiments x seeds.

    python -m safe_dist.sweep --root runs/grid --grid sparsifier=safe,admm --grid sp=0.9,0.95 \\
        --seeds 1,2,3 --parallel 2 -- --config config:fashion_mnist_lenet --num_epochs 6

Everything after `--` goes to every cell's `python -m safe_dist.train`. A grid key is a train
flag (`sparsifier`, `sp`, `lambda`, ...), `config` (a base config of configs/) or a config
path (`train.max_steps`, given as `--config set:PATH=VALUE`). Each cell (one value per key,
one seed) is a workdir `ROOT/<key>-<value>_..._seed-<seed>`. Every cell's experiment is built
first, as `safe_dist.train` builds it: a bad key or value, or a workdir holding another
experiment, stops the sweep before any run. A cell with `summary.json` is finished and
skipped; any other is run on its workdir, which resumes from its checkpoint. Cells run as
local processes, `--parallel` at a time (log: `CELL/train.log`), or with `--slurm` are
submitted with `sbatch launch/slurm/train.sbatch` (log: `CELL/slurm-<job>.out`; a cell whose
job is still queued or running is not submitted again). The report over the finished cells
goes to `ROOT/report/` (`safe_dist.report`: mean +- std over seeds), over every finished run
in ROOT: several sweeps into one root (e.g. one per method, each over its own settings) share
one report, which names each method's best setting where the runs are on a validation split.

    python -m safe_dist.sweep --root runs/tuned --best_of runs/tune --seeds 1,2,3 \
        -- --config config:fashion_mnist_lenet --num_epochs 6

`--best_of TUNE_ROOT` replaces `--grid`: one cell per method (and model, dataset, sparsity)
tried in TUNE_ROOT with several settings on a validation split, at its best one, for each
seed. The flags after `--` must rebuild the tuning runs' experiments but for the seed and
--validation_examples (checked before any run), so the cells train on every training example
and are scored on the test split, which took no part in the choice.
"""

import argparse
import dataclasses
import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Optional

from absl import flags as absl_flags

from safe_dist import flags as run_flags
from safe_dist import report
from safe_dist import train  # defines the train flags parsed here
from safe_dist import workdir as workdir_lib
from safe_dist.experiment import Experiment

FLAGS = absl_flags.FLAGS
CONFIG_KEY = "config"
# Train flags a grid may not set: the sweep owns the workdir and the seeds; multi-host
# placement is the launcher's.
RESERVED_FLAGS = ("workdir", "seed", "resume_training", "coordinator_address", "num_processes",
                  "process_id")
# Fields in which a --best_of cell may differ from the tuning run it repeats: the seed, and the
# held-out split (the rerun trains on every training example and evaluates on the test split).
BEST_OF_FREE = ("train.seed", "data.validation_examples")
SBATCH_SCRIPT = os.path.join("launch", "slurm", "train.sbatch")
JOB_FILE = "slurm_job"
LOG_FILE = "train.log"
REQUEUE_EXIT_CODE = train.REQUEUE_EXIT_CODE


class SweepError(ValueError):
  """A bad grid, seed list or train flag, found before any run starts."""


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid: its readable name, workdir and `safe_dist.train` arguments."""
  name: str
  workdir: str
  args: tuple  # the train flags, --workdir last

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, workdir_lib.SUMMARY_FILE))

  @property
  def started(self) -> bool:
    return workdir_lib.read_record(self.workdir) is not None


def grid_keys() -> tuple[str, ...]:
  """The keys a grid may vary besides config paths: `config` and the train flags."""
  names = {f.name for f in FLAGS.flags_by_module_dict()[run_flags.__name__]}
  return (CONFIG_KEY, *sorted(names - set(RESERVED_FLAGS)))


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
  """`KEY=V1,V2` strings -> [(key, values)], in order; SweepError names a bad one."""
  grid = []
  for spec in specs:
    key, _, values = spec.partition("=")
    values = [v for v in values.split(",") if v]
    if not key or not values:
      raise SweepError(f"--grid {spec}: expected KEY=VALUE[,VALUE...]")
    if "." not in key and key not in grid_keys():
      why = ("the sweep sets it: use --seeds" if key == "seed" else
             "the sweep sets it" if key in RESERVED_FLAGS else "unknown key")
      raise SweepError(f"--grid {key}: {why}; allowed: {', '.join(grid_keys())}, or a config "
                       "path such as train.max_steps (--config set:PATH=VALUE)")
    if key == CONFIG_KEY:
      unknown = [v for v in values if v not in run_flags.CONFIG_NAMES]
      if unknown:
        raise SweepError(f"--grid config={unknown[0]}: unknown config; allowed: "
                         f"{', '.join(run_flags.CONFIG_NAMES)}")
    if key in (k for k, _ in grid):
      raise SweepError(f"--grid {key} given twice; give all its values in one --grid")
    grid.append((key, values))
  return grid


def parse_seeds(text: Optional[str]) -> list[Optional[int]]:
  """`1,2,3` -> [1, 2, 3]; None (no --seeds): one seed, the config's."""
  if text is None:
    return [None]
  try:
    seeds = [int(s) for s in text.split(",") if s]
  except ValueError:
    seeds = []
  if not seeds:
    raise SweepError(f"--seeds must be integers separated by commas, got {text!r}")
  return seeds


def _flag_names(args: list[str]) -> set:
  """Names of the flags given in `args` (`--name`, `--name=value`, `--noname`)."""
  names = set()
  for arg in args:
    if arg.startswith("--") and len(arg) > 2:
      name = arg[2:].split("=", 1)[0]
      names.add(name[2:] if name.startswith("no") and name[2:] in FLAGS else name)
  return names


def check_common_args(common: list[str], grid, seeded: bool) -> None:
  """The flags after `--` may not set what the sweep sets per cell."""
  given = _flag_names(common)
  owned = {"workdir"} | ({"seed"} if seeded else set())
  owned |= {k for k, _ in grid if k != CONFIG_KEY and "." not in k}
  clash = sorted(given & owned)
  if clash:
    raise SweepError(f"--{clash[0]} after -- is set by the sweep for each cell (--grid, "
                     "--seeds, --root); leave it out there")


def _name_part(key: str, value) -> str:
  return f"{key}-{value}".replace(os.sep, "-").replace(" ", "-")


def make_cells(root: str, grid, seeds: list[Optional[int]], common: list[str]) -> list[Cell]:
  """Every combination of grid values and seeds, in the order given (seeds innermost)."""
  cells = []
  keys = [k for k, _ in grid]
  for values in itertools.product(*(v for _, v in grid)):
    chosen = list(zip(keys, values))
    base = [f"--config=config:{v}" for k, v in chosen if k == CONFIG_KEY]
    paths = [f"--config=set:{k}={v}" for k, v in chosen if "." in k]
    named = [f"--{k}={v}" for k, v in chosen if k != CONFIG_KEY and "." not in k]
    for seed in seeds:
      parts = [_name_part(k, v) for k, v in chosen]
      parts += [] if seed is None else [_name_part("seed", seed)]
      name = "_".join(parts) or "run"
      workdir = os.path.join(os.path.abspath(root), name)
      seed_flag = [] if seed is None else [f"--seed={seed}"]
      cells.append(Cell(name, workdir, (*base, *common, *paths, *named, *seed_flag,
                                        f"--workdir={workdir}")))
  return cells


def best_cells(root: str, tune_root: str, seeds: list[Optional[int]],
               common: list[str]) -> list[Cell]:
  """`--best_of TUNE_ROOT`: for each (model, dataset, method, sparsity) tried there with several
  settings on a validation split, its best setting (`report.best_settings`) as a cell per
  seed. Each cell must rebuild its tuning run's experiment but for the seed and the held-out
  split: the flags after `--` are the tuning sweep's, without --validation_examples."""
  if not os.path.isdir(tune_root):
    raise SweepError(f"--best_of {tune_root!r} is not a directory (a sweep's --root)")
  runs = [report.load_run(w, os.path.basename(w)) for w in report.finished_workdirs(tune_root)]
  selections = report.best_settings(report.seed_groups(runs))
  if not selections:
    raise SweepError(f"--best_of {tune_root}: no method there ran with two or more settings "
                     "on a validation split (--validation_examples): nothing to choose from")
  cells = []
  for sel in sorted(selections, key=lambda s: tuple(str(v) for v in s.task)):
    tuned = sel.best.runs[0]
    chosen = [("sparsifier", tuned.experiment["sparsifier.name"]),
              ("sp", tuned.experiment["sparsifier.sparsity"]),
              *((k, tuned.experiment[k]) for k in sel.knobs)]
    for cell in make_cells(root, [(k, [v]) for k, v in chosen], seeds, common):
      try:
        mine = workdir_lib.experiment_record(cell_experiment(cell))
      except (ValueError, AttributeError, TypeError, absl_flags.Error) as e:
        raise SweepError(f"cell {cell.name}: {e}") from None
      differ = [k for k in workdir_lib.differences(tuned.experiment, mine)
                if k not in BEST_OF_FREE]
      if differ:
        details = ", ".join(f"{k}: {tuned.experiment.get(k)!r} there, {mine.get(k)!r} here"
                            for k in differ[:8])
        raise SweepError(f"--best_of: cell {cell.name} is not the tuning run {tuned.workdir} "
                         f"but for the seed and the held-out split ({details}): give after "
                         "-- the flags of the tuning sweep, without --validation_examples")
      cells.append(cell)
  return cells


def cell_experiment(cell: Cell) -> Experiment:
  """The experiment `python -m safe_dist.train` builds from the cell's arguments (its own
  flags and config parsing)."""
  FLAGS.unparse_flags()
  extra = FLAGS(run_flags.with_default_config(["safe_dist.train", *cell.args]))[1:]
  if extra:
    raise SweepError(f"unexpected arguments {extra} (train flags start with --)")
  return run_flags.build_experiment(run_flags.resolved_config(FLAGS[CONFIG_KEY]))


def check_cells(cells: list[Cell]) -> None:
  """Builds every cell's experiment and checks it against its workdir, before any run."""
  for cell in cells:
    try:
      workdir_lib.check_workdir(cell_experiment(cell), cell.workdir)
    except (ValueError, AttributeError, TypeError, absl_flags.Error) as e:
      raise SweepError(f"cell {cell.name}: {e}") from None


def _log(message: str) -> None:
  print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_command(cell: Cell) -> list[str]:
  return [sys.executable, "-m", "safe_dist.train", *cell.args]


def run_local(cells: list[Cell], parallel: int) -> dict[str, int]:
  """Runs the cells as local processes, `parallel` at a time; {name: exit status}.

  SIGINT or SIGTERM to the sweep is passed on to the running cells as SIGTERM (each saves a
  checkpoint and exits 85) and starts no more cells. Cells run in their own sessions, so
  that a terminal's Ctrl-C reaches only the sweep.
  """
  waiting, running, status = list(cells), {}, {}
  stopping = []

  def stop(signum, frame):
    del frame
    if not stopping:
      _log(f"got signal {signum}: asking {len(running)} running cell(s) to checkpoint and stop")
    stopping.append(signum)
    for process in list(running):
      process.send_signal(signal.SIGTERM)

  handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while running or (waiting and not stopping):  # a stop starts no more cells
      while waiting and len(running) < parallel and not stopping:
        cell = waiting.pop(0)
        os.makedirs(cell.workdir, exist_ok=True)
        log_path = os.path.join(cell.workdir, LOG_FILE)
        with open(log_path, "a") as log:
          log.write(f"[sweep {time.strftime('%Y-%m-%d %H:%M:%S')}] "
                    f"{shlex.join(train_command(cell))}\n")
          log.flush()
          process = subprocess.Popen(train_command(cell), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        running[process] = (cell, time.time())
        _log(f"start {cell.name} ({'resuming' if cell.started else 'new'}), log {log_path}")
      for process, (cell, start) in list(running.items()):
        code = process.poll()
        if code is None:
          continue
        del running[process]
        status[cell.name] = code
        outcome = {0: "done", REQUEUE_EXIT_CODE: "stopped after a checkpoint"}.get(
            code, f"FAILED (exit {code}), see {os.path.join(cell.workdir, LOG_FILE)}")
        _log(f"{outcome}: {cell.name} after {time.time() - start:.0f} s")
      time.sleep(0.2)
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
  return status


def sbatch_command(cell: Cell, script: str, sbatch_args: list[str]) -> list[str]:
  return ["sbatch", "--parsable", f"--job-name={cell.name}",
          f"--output={os.path.join(cell.workdir, 'slurm-%j.out')}", *sbatch_args, script,
          *cell.args]


def queued_job(cell: Cell) -> Optional[str]:
  """The id of the cell's submitted job while Slurm still lists it, else None."""
  path = os.path.join(cell.workdir, JOB_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    job = f.read().strip()
  listed = subprocess.run(["squeue", "--noheader", "--format=%i", f"--jobs={job}"],
                          capture_output=True, text=True, check=False)
  return job if listed.returncode == 0 and job in listed.stdout.split() else None


def submit_slurm(cells: list[Cell], script: str, sbatch_args: list[str]) -> None:
  """One sbatch per cell; the job id is kept in `CELL/slurm_job`."""
  for cell in cells:
    os.makedirs(cell.workdir, exist_ok=True)
    result = subprocess.run(sbatch_command(cell, script, sbatch_args), capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
      raise SweepError(f"sbatch failed for {cell.name}: {result.stderr.strip()}")
    job = result.stdout.strip().split(";")[0]
    with open(os.path.join(cell.workdir, JOB_FILE), "w") as f:
      f.write(job + "\n")
    _log(f"submitted {cell.name}: job {job}")


def write_report(root: str, cells: list[Cell]) -> None:
  """The report over every finished run in root: this grid's and earlier sweeps' into it."""
  finished = report.finished_workdirs(root)
  if not finished:
    _log("no finished cell yet: no report")
    return
  mine = sum(c.finished for c in cells)
  _log(f"report over {len(finished)} finished run(s) in {root}: {mine} of this grid's "
       f"{len(cells)} cell(s), {len(finished) - mine} from other sweeps")
  report.write_report(finished, os.path.join(root, "report"))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """The sweep's own options, and the train flags after `--`."""
  own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
      argv, [])
  parser = argparse.ArgumentParser(prog="python -m safe_dist.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="directory of the cells' workdirs")
  parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                      help="a grid axis; repeat for more axes")
  parser.add_argument("--best_of", default=None, metavar="TUNE_ROOT",
                      help="instead of --grid: each method's best validation setting in "
                      "TUNE_ROOT (report.md's 'Best setting per method'), with --seeds")
  parser.add_argument("--seeds", default=None, help="seeds, e.g. 1,2,3 (default: the config's)")
  parser.add_argument("--parallel", type=int, default=1, help="local cells at a time")
  parser.add_argument("--slurm", action="store_true", help="submit each cell with sbatch")
  parser.add_argument("--sbatch_script", default=SBATCH_SCRIPT,
                      help="the batch script (relative paths: from the current directory)")
  parser.add_argument("--sbatch_args", default="",
                      help="options for every sbatch, e.g. '-N 1 --gpus-per-node=1 --time=4:00:00'")
  parser.add_argument("--dry_run", action="store_true",
                      help="check the grid and print each cell's command; run nothing")
  args = parser.parse_args(own)
  if args.parallel < 1:
    parser.error(f"--parallel must be >= 1, got {args.parallel}")
  return args, common


def main(argv: Optional[list[str]] = None) -> int:
  args, common = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    grid, seeds = parse_grid(args.grid), parse_seeds(args.seeds)
    if args.best_of is not None:
      if grid:
        raise SweepError("--best_of chooses each cell's setting: leave out --grid")
      grid = [("sparsifier", []), ("sp", [])]  # what every --best_of cell sets
    check_common_args(common, grid, seeded=args.seeds is not None)
    run_flags.checked_config_names(["safe_dist.train", *common])
    if args.best_of is None:
      cells = make_cells(args.root, grid, seeds, common)
    else:
      cells = best_cells(args.root, args.best_of, seeds, common)
    names = [c.name for c in cells]
    if len(set(names)) < len(names):
      raise SweepError("two cells share a name: the grid repeats a value")
    check_cells(cells)
    if args.slurm and not os.path.isfile(args.sbatch_script):
      raise SweepError(f"--sbatch_script {args.sbatch_script} not found: run from the "
                       "repository root or pass its path")
  except SweepError as e:
    run_flags.fail(str(e))
  todo = [c for c in cells if not c.finished]
  _log(f"{len(cells)} cell(s) in {os.path.abspath(args.root)}: {len(cells) - len(todo)} "
       f"finished, {sum(c.started for c in todo)} to resume, "
       f"{sum(not c.started for c in todo)} new")
  for cell in cells:
    if cell.finished:
      _log(f"skip {cell.name}: finished ({workdir_lib.SUMMARY_FILE} present)")
  sbatch_args = shlex.split(args.sbatch_args)
  if args.slurm:
    queued = {c.name: queued_job(c) for c in todo}
    for cell in todo:
      if queued[cell.name]:
        _log(f"skip {cell.name}: job {queued[cell.name]} is queued or running")
    todo = [c for c in todo if not queued[c.name]]
  if args.dry_run:
    for cell in todo:
      print(shlex.join(sbatch_command(cell, args.sbatch_script, sbatch_args) if args.slurm
                       else train_command(cell)))
    return 0
  if args.slurm:
    submit_slurm(todo, args.sbatch_script, sbatch_args)
    _log(f"submitted {len(todo)} job(s); run this command again when they are done: finished "
         "cells are skipped and the report covers them")
    write_report(args.root, cells)
    return 0
  status = run_local(todo, args.parallel)
  write_report(args.root, cells)
  unfinished = [c.name for c in cells if not c.finished]
  if unfinished:
    _log(f"{len(unfinished)} cell(s) not finished: {', '.join(unfinished)}; run this command "
         "again to resume them")
    return 1
  return 0 if all(code == 0 for code in status.values()) else 1


def run():
  """Console-script entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run()
