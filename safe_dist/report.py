"""Plots and a markdown table over finished runs, from their TensorBoard events and summary.json.

    python -m safe_dist.report WORKDIR [WORKDIR ...] [--out DIR]
    python -m safe_dist.report --root ROOT [--out DIR]    # every finished run in ROOT

Writes accuracy_vs_sparsity.png, training_curves.png and report.md to DIR (default: the
first workdir's `report/`, or ROOT/report). Only these three files are written; existing ones
are replaced, and each replacement is reported. Runs whose experiments (experiment.json)
differ only by `train.seed` form one group: report.md gets a table of mean +- std over the
seeds of each group (with the final network's Hessian and, where `safe_dist.eval` ran, its
PGD and corruption accuracies), and the plot shows each group's mean with its std as an error
bar (one panel per method where a method ran with several settings). Where
one method was run with several settings on a validation split (--validation_examples), the
report names the best setting of each (model, dataset, method, sparsity): a tuning budget read
off validation runs only, never off the test split.
"""

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from typing import NamedTuple, Optional

import numpy as np

from safe_dist import workdir as workdir_lib

SEED_KEY = "train.seed"
# Experiment fields that have their own columns in the tables.
METHOD_KEYS = ("sparsifier.name", "sparsifier.sparsity")
# (key, column, in percent) of the per-group table: mean +- std over the seeds. A key is a
# summary.json field or, failing that, a TensorBoard tag's value at the run's last step
# (`Run.final`); a column no group has is left out.
GROUP_METRICS = (("val_accuracy", "accuracy (%)", True),
                 ("val_accuracy_before_projection", "accuracy of x before projection (%)", True),
                 ("weight_sparsity", "measured sparsity (%)", True),
                 ("sharpness/hessian_max_eig_projected",
                  "top Hessian eigenvalue, final network", False),
                 ("sharpness/hessian_trace_projected", "Hessian trace, final network", False))
SUMMARY_FILE = "summary.json"
ACCURACY_PNG = "accuracy_vs_sparsity.png"
CURVES_PNG = "training_curves.png"
REPORT_MD = "report.md"
# Past this many runs the training curves are colored by sparsifier rather than by run.
MAX_CURVE_RUNS = 10
CURVE_TAGS = (
    ("train/loss", "training loss"),
    ("val/masked_accuracy", "accuracy (projected weights)"),
    ("admm/constraint_gap", "||w - z|| / ||w||"),
    ("admm/lambda", "penalty lambda"),
    ("sharpness/sam", "f(w + e) - f(w)"),
    ("sharpness/hessian_max_eig", "top Hessian eigenvalue"),
    ("sharpness/hessian_trace", "Hessian trace"),
)


class Run(NamedTuple):
  name: str
  workdir: str
  summary: dict
  scalars: dict  # tag -> (steps, values), sorted by step
  experiment: dict  # the record of experiment.json ({} where there is none)
  evals: dict = {}  # column -> accuracy, from the safe_dist.eval files (`eval_results`)

  def final(self, key: str) -> Optional[float]:
    """summary.json's `key`, an evaluation's column (`eval_results`), or the value of the
    TensorBoard tag `key` logged at the run's last step (summary's `steps`): a measurement of
    the final network, not of an earlier one."""
    for source in (self.summary, self.evals):
      if source.get(key) is not None:
        return source[key]
    steps, values = self.scalars.get(key, ((), ()))
    if len(steps) and steps[-1] == self.summary.get("steps"):
      return float(values[-1])
    return None


class SeedGroup(NamedTuple):
  """Runs of one experiment that differ only by seed (a run without experiment.json is a
  group of its own)."""
  runs: list
  setting: dict  # values of the fields, other than method and sparsity, that vary by group

  def values(self, key: str) -> np.ndarray:
    finals = (r.final(key) for r in self.runs)
    return np.array([v for v in finals if v is not None], dtype=float)

  def mean_std(self, key: str) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof=1) over the runs that have `key`; the std
    is None with fewer than two values, both are None with none."""
    values = self.values(key)
    if not len(values):
      return None, None
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)

  @property
  def summary(self) -> dict:
    return self.runs[0].summary

  @property
  def seeds(self) -> list:
    return [r.experiment.get(SEED_KEY, "?") for r in self.runs]


def load_scalars(workdir: str) -> dict:
  """All scalar series of the event files under workdir; a rewritten step keeps the latest."""
  # pylint: disable-next=import-outside-toplevel
  from tensorboard.backend.event_processing import event_accumulator
  by_tag = defaultdict(dict)  # tag -> step -> (wall_time, value)
  folders = sorted({root for root, _, files in os.walk(workdir)
                    if any("tfevents" in f for f in files)})
  for folder in folders:
    acc = event_accumulator.EventAccumulator(
        folder, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
      for event in acc.Scalars(tag):
        old = by_tag[tag].get(event.step)
        if old is None or event.wall_time >= old[0]:
          by_tag[tag][event.step] = (event.wall_time, event.value)
  return {tag: (np.array(sorted(points)), np.array([points[s][1] for s in sorted(points)]))
          for tag, points in by_tag.items()}


def eval_results(workdir: str) -> dict:
  """{column: accuracy} of the robustness evaluations in workdir (`safe_dist.eval`'s
  eval_*.json, whatever their names): 'PGD linf 0.1, 10 steps (%)' -> robust accuracy,
  'corruptions, intensity 3 (%)' -> the mean over the corruptions. Where two files give one
  column, the later checkpoint's wins; two of one checkpoint that disagree: a warning, and
  the first by name."""
  columns = {}  # column -> (step, value, file name)
  for name in sorted(os.listdir(workdir)):
    if not (name.startswith("eval_") and name.endswith(".json")):
      continue
    with open(os.path.join(workdir, name)) as f:
      result = json.load(f)
    if result.get("mode") == "adversarial":
      a = result["attack"]
      column, value = (f"PGD {a['norm']} {a['bound']:.4g}, {a['steps']} steps (%)",
                       result["robust_accuracy"])
    elif result.get("mode") == "corrupt":
      column, value = (f"corruptions, intensity {result['intensity']} (%)",
                       result["mean_accuracy"])
    else:
      continue
    step = result.get("step", -1)
    if column in columns:
      old_step, old_value, old_name = columns[column]
      if step < old_step or (step == old_step and value == old_value):
        continue
      if step == old_step:
        print(f"warning: {workdir}: {old_name} and {name} give '{column}' different values "
              f"at step {step}; reporting {old_name}'s", file=sys.stderr)
        continue
    columns[column] = (step, value, name)
  return {column: value for column, (_, value, _) in columns.items()}


def load_run(workdir: str, name: str) -> Run:
  path = os.path.join(workdir, SUMMARY_FILE)
  summary = {}
  if os.path.isfile(path):
    with open(path) as f:
      summary = json.load(f)
  else:
    print(f"warning: {path} not found; {name} has curves only", file=sys.stderr)
  return Run(name, workdir, summary, load_scalars(workdir),
             workdir_lib.read_record(workdir) or {}, eval_results(workdir))


def _differences(a: Run, b: Run) -> Optional[set]:
  """Experiment fields in which two runs differ (resumable ones aside); None: unknown. Both
  ways round: a field one record lacks (written before the field existed) counts as its
  default."""
  if not a.experiment or not b.experiment:
    return None
  return (set(workdir_lib.differences(a.experiment, b.experiment))
          & set(workdir_lib.differences(b.experiment, a.experiment)))


def _differ_only_by_seed(a: Run, b: Run) -> bool:
  differ = _differences(a, b)
  return differ is not None and differ <= {SEED_KEY}


def _varying_fields(runs: list[Run]) -> set:
  """Experiment fields in which some two of the runs differ."""
  varying = set()
  for i, a in enumerate(runs):
    for b in runs[i + 1:]:
      varying |= _differences(a, b) or set()
  return varying


def _setting_fields(runs: list[Run]) -> list[str]:
  """The fields in which the runs differ, sorted, other than seed, method and sparsity (those
  have their own columns and axes)."""
  return sorted(_varying_fields(runs) - {SEED_KEY, *METHOD_KEYS})


def seed_groups(runs: list[Run]) -> list[SeedGroup]:
  """The runs grouped by experiment up to the seed, in order of first appearance."""
  groups: list[list[Run]] = []
  for run in runs:
    home = next((g for g in groups if _differ_only_by_seed(g[0], run)), None)
    if home is None:
      groups.append([run])
    else:
      home.append(run)
  varying = _setting_fields([g[0] for g in groups])
  return [SeedGroup(g, {k: g[0].experiment.get(k) for k in varying}) for g in groups]


class Selection(NamedTuple):
  """One method's settings, tried on a validation split, best first."""
  task: tuple  # (model, dataset, sparsifier, target_sparsity)
  ranked: list  # SeedGroups by mean validation accuracy, highest first (ties: first run first)
  knobs: tuple  # the experiment fields that vary among them

  @property
  def best(self) -> SeedGroup:
    return self.ranked[0]


def _task(group: SeedGroup) -> tuple:
  s = group.summary
  return s.get("model"), s.get("dataset"), s.get("sparsifier"), s.get("target_sparsity")


def best_settings(groups: list[SeedGroup]) -> list[Selection]:
  """For each (model, dataset, sparsifier, target sparsity) run with two or more settings, all
  evaluated on the validation split: the settings ranked by mean validation accuracy over
  their seeds. Groups with any test-split run take no part: nothing is chosen on test data."""
  tasks = defaultdict(list)
  for g in groups:
    on_validation = all(r.summary.get("eval_split") == "validation" for r in g.runs)
    if on_validation and g.mean_std("val_accuracy")[0] is not None:
      tasks[_task(g)].append(g)
  selections = []
  for task, candidates in tasks.items():
    if len(candidates) < 2:
      continue
    ranked = sorted(candidates, key=lambda g: -g.mean_std("val_accuracy")[0])  # stable
    # Method and sparsity are one task's own: the fields left are the method's knobs.
    knobs = tuple(_setting_fields([g.runs[0] for g in candidates]))
    selections.append(Selection(task, ranked, knobs))
  return selections


def selection_table(selections: list[Selection]) -> list[str]:
  """Markdown lines: per method, the best setting, its accuracy and the spread over settings."""
  lines = ["| model | dataset | sparsifier | target sparsity | settings tried | best setting "
           "| validation accuracy (%) | worst setting's (%) |",
           "|---|---|---|---:|---:|---|---:|---:|"]
  for sel in sorted(selections, key=lambda s: tuple(str(v) for v in s.task)):
    model, dataset, sparsifier, sparsity = sel.task
    best = sel.best.runs[0].experiment
    setting = ", ".join(f"`{k}={best.get(k)}`" for k in sel.knobs) or "-"
    cells = [str(model), str(dataset), str(sparsifier), _pct(sparsity), str(len(sel.ranked)),
             setting, mean_std_text(*sel.best.mean_std("val_accuracy")),
             mean_std_text(*sel.ranked[-1].mean_std("val_accuracy"))]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def finished_workdirs(root: str) -> list[str]:
  """The run directories directly under root that hold summary.json, by name."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--root {root!r} is not a directory")
  return [os.path.join(root, name) for name in sorted(os.listdir(root))
          if os.path.isfile(os.path.join(root, name, SUMMARY_FILE))]


def run_names(workdirs: list[str]) -> list[str]:
  """Folder names, made unique with a suffix where two runs share one."""
  names, seen = [], defaultdict(int)
  for w in workdirs:
    base = os.path.basename(os.path.normpath(os.path.abspath(w)))
    seen[base] += 1
    names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
  return names


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _knob_text(field: str, value) -> str:
  # Within a sparsifier's panel its own fields need no prefix.
  return f"{field.removeprefix('sparsifier.')}={value}"


def accuracy_series(groups: list[SeedGroup]) -> dict:
  """{sparsifier: {setting: [(target sparsity %, mean accuracy %, std %), ...]}}: one series per
  setting of a method, the setting named by the fields in which that method's groups differ
  (sparsity and seed aside), so a tuning root's ADMM runs are told apart by lambda alone."""
  by_method = defaultdict(list)
  for g in groups:
    if g.summary.get("target_sparsity") is not None and g.mean_std("val_accuracy")[0] is not None:
      by_method[g.summary.get("sparsifier", "?")].append(g)
  series = {}
  for method, method_groups in sorted(by_method.items()):
    knobs = _setting_fields([g.runs[0] for g in method_groups])
    lines = defaultdict(list)
    for g in method_groups:
      mean, std = g.mean_std("val_accuracy")
      setting = ", ".join(_knob_text(k, g.runs[0].experiment.get(k)) for k in knobs)
      lines[setting or "one setting"].append(
          (100 * g.summary["target_sparsity"], 100 * mean, 100 * (std or 0.0)))
    series[method] = {label: sorted(points) for label, points in sorted(lines.items())}
  return series


def accuracy_axis_label(summaries: list[dict]) -> str:
  """'final test accuracy (%)', or validation, by the runs' `eval_split`; both or unknown:
  no split named."""
  splits = {s.get("eval_split") for s in summaries}
  split = splits.pop() if len(splits) == 1 else None
  return f"final {split + ' ' if split in ('test', 'validation') else ''}accuracy (%)"


def _draw_series(ax, lines: dict, legend_title: str) -> None:
  """Error-bar lines; where all points share one sparsity they are spread sideways (±0.4) so
  that the settings do not hide one another."""
  markers = "osD^vP*X"
  xs = {x for points in lines.values() for x, _, _ in points}
  spread = 0.8 / max(len(lines) - 1, 1) if len(xs) == 1 and len(lines) > 1 else 0.0
  for i, (label, points) in enumerate(lines.items()):
    x, y, err = zip(*points)
    x = np.asarray(x) + spread * (i - (len(lines) - 1) / 2)
    ax.errorbar(x, y, yerr=err, marker=markers[i % len(markers)], markersize=6,
                linewidth=1.5, capsize=3, label=label)
  if spread:
    ax.set_xticks(sorted(xs))
  ax.grid(True, alpha=0.3)
  ax.legend(title=legend_title, fontsize="small", title_fontsize="small")


def plot_accuracy_vs_sparsity(groups: list[SeedGroup], path: str) -> bool:
  """Final val_accuracy against target_sparsity, the mean over seeds with the std as an error
  bar: one line per sparsifier, or, where a sparsifier was run with several settings (a
  tuning root), one panel per sparsifier with a line per setting. False if no data."""
  series = accuracy_series(groups)
  if not series:
    return False
  plt = _pyplot()
  seeds = max(len(g.runs) for g in groups)
  title = "Accuracy vs sparsity" + (" (mean +- std over seeds)" if seeds > 1 else "")
  ylabel = accuracy_axis_label([r.summary for g in groups for r in g.runs])
  if all(len(lines) == 1 for lines in series.values()):
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    _draw_series(ax, {method: next(iter(lines.values())) for method, lines in series.items()},
                 "sparsifier")
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
  else:
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows + 0.5), sharey=True,
                             squeeze=False)
    for ax, (method, lines) in zip(axes.flat, series.items()):
      _draw_series(ax, lines, "setting")
      ax.set_title(method)
      ax.set_xlabel("target sparsity (%)")
    for ax in axes[:, 0]:
      ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(series):]:
      ax.set_visible(False)
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def curve_keys(runs: list[Run]) -> tuple[list[str], str]:
  """The legend entry of each run's curves and the legend's title: the run's name, or, past
  MAX_CURVE_RUNS runs (a tuning root), its sparsifier, so that a method's runs share a color."""
  if len(runs) <= MAX_CURVE_RUNS:
    return [r.name for r in runs], "run"
  return [r.summary.get("sparsifier", r.name) for r in runs], f"sparsifier ({len(runs)} runs)"


def plot_training_curves(runs: list[Run], path: str) -> bool:
  """One subplot per tag of CURVE_TAGS that some run has; False if none has any."""
  tags = [(t, label) for t, label in CURVE_TAGS if any(t in r.scalars for r in runs)]
  if not tags:
    return False
  plt = _pyplot()
  cols = min(3, len(tags))
  rows = math.ceil(len(tags) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows + 0.6), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  keys, legend_title = curve_keys(runs)
  entries = list(dict.fromkeys(keys))
  color_of = {key: colors[i % len(colors)] for i, key in enumerate(entries)}
  shared = len(entries) < len(runs)
  for ax, (tag, label) in zip(axes.flat, tags):
    for r, key in zip(runs, keys):
      if tag in r.scalars:
        steps, values = r.scalars[tag]
        ax.plot(steps, values, color=color_of[key], linewidth=1.0 if shared else 1.5,
                alpha=0.6 if shared else 1.0, marker="o" if len(steps) < 25 else None,
                markersize=3)
    ax.set_title(tag)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
  for ax in list(axes.flat)[len(tags):]:
    ax.set_visible(False)
  handles = [plt.Line2D([], [], color=color_of[key], linewidth=2, label=key) for key in entries]
  fig.legend(handles=handles, loc="lower center", ncol=min(len(entries), 4), frameon=False,
             title=legend_title)
  legend_rows = math.ceil(len(entries) / 4)
  fig.tight_layout(rect=(0, (0.45 + 0.25 * legend_rows) / (3.6 * rows + 0.6), 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def mean_std_text(mean: Optional[float], std: Optional[float], percent: bool = True) -> str:
  """Percent, two decimals: "91.23 ± 0.45" (a single value: "91.23"); else four digits."""
  if mean is None:
    return "-"
  text = (lambda v: f"{100 * v:.2f}") if percent else (lambda v: f"{v:.4g}")
  return text(mean) + ("" if std is None else f" ± {text(std)}")


def _metric_cell(group: SeedGroup, key: str, percent: bool) -> str:
  """mean ± std, and how many of the group's runs have the value where not all do."""
  count = len(group.values(key))
  text = mean_std_text(*group.mean_std(key), percent)
  return text + (f" ({count} of {len(group.runs)})" if 0 < count < len(group.runs) else "")


def group_table(groups: list[SeedGroup]) -> list[str]:
  """Markdown lines: one row per group, mean ± std over its seeds."""
  setting = list(groups[0].setting)
  evals = sorted({column for g in groups for r in g.runs for column in r.evals})
  metrics = [m for m in GROUP_METRICS if any(len(g.values(m[0])) for g in groups)]
  metrics += [(column, column, True) for column in evals]
  header = ["sparsifier", "target sparsity", *setting, "seeds", *(m[1] for m in metrics)]
  lines = ["| " + " | ".join(header) + " |",
           "|---|---:|" + "---|" * len(setting) + "---|" + "---:|" * len(metrics)]
  order = lambda g: (g.summary.get("sparsifier", ""), g.summary.get("target_sparsity", 0),
                     str(list(g.setting.values())))
  for g in sorted(groups, key=order):
    cells = [g.summary.get("sparsifier", "-"), _pct(g.summary.get("target_sparsity")),
             *(str(v) for v in g.setting.values()),
             f"{len(g.runs)} ({', '.join(str(s) for s in g.seeds)})",
             *(_metric_cell(g, key, percent) for key, _, percent in metrics)]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def run_locations(runs: list[Run]) -> str:
  """Where the runs are: one folder, when each run is the subfolder of its name; else each."""
  parents = {os.path.dirname(os.path.normpath(r.workdir)) for r in runs}
  if len(parents) == 1 and all(
      r.name == os.path.basename(os.path.normpath(r.workdir)) for r in runs):
    return f"Runs: the folders of `{parents.pop()}`."
  return "Runs: " + ", ".join(f"`{r.name}` = `{r.workdir}`" for r in runs) + "."


def markdown(runs: list[Run], pngs: list[str]) -> str:
  lines = ["# SAFE pruning report", "",
           "| run | model | dataset | sparsifier | target sparsity | measured sparsity "
           "| accuracy | steps |",
           "|---|---|---|---|---:|---:|---:|---:|"]
  for r in runs:
    s = r.summary
    lines.append(
        f"| {r.name} | {s.get('model', '-')} | {s.get('dataset', '-')} "
        f"| {s.get('sparsifier', '-')} | {_pct(s.get('target_sparsity'))} "
        f"| {_pct(s.get('weight_sparsity'))} | {_pct(s.get('val_accuracy'))}"
        f"{' (validation)' if s.get('eval_split') == 'validation' else ''} "
        f"| {s.get('steps', '-')} |")
  lines += ["", "Accuracy: the final (projected, BN-recalibrated) network's, on the test "
            "split, or on held-out training examples where marked (validation; "
            "--validation_examples). " + run_locations(runs)]
  groups = seed_groups([r for r in runs if r.summary])
  if any(len(g.runs) > 1 for g in groups):
    lines += ["", "## Mean ± std over seeds", "",
              "Runs whose experiments differ only by `train.seed`; std is the sample standard "
              "deviation (ddof=1), left out for a single run.", "", *group_table(groups)]
  selections = best_settings(groups)
  if selections:
    lines += ["", "## Best setting per method (validation)", "",
              "Each method's settings compared by mean accuracy on held-out training examples "
              "(--validation_examples) over their seeds; runs on the test split take no part. "
              "Best setting: the fields in which that method's runs differ.", "",
              *selection_table(selections)]
  for png in pngs:
    title = os.path.splitext(png)[0].replace("_", " ")
    lines += ["", f"## {title}", "", f"![{title}]({png})", "", f"[{png}]({png})"]
  return "\n".join(lines) + "\n"


def write_report(workdirs: list[str], out_dir: Optional[str] = None) -> str:
  """Reads the runs, writes the PNGs and report.md; returns the markdown's path."""
  for w in workdirs:
    if not os.path.isdir(w):
      raise FileNotFoundError(f"workdir {w!r} does not exist")
  out_dir = out_dir or os.path.join(workdirs[0], "report")
  os.makedirs(out_dir, exist_ok=True)
  runs = [load_run(w, n) for w, n in zip(workdirs, run_names(workdirs))]

  def target(name):
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
      print(f"replacing {path}")
    return path

  pngs = []
  if plot_accuracy_vs_sparsity(seed_groups(runs), target(ACCURACY_PNG)):
    pngs.append(ACCURACY_PNG)
  if plot_training_curves(runs, target(CURVES_PNG)):
    pngs.append(CURVES_PNG)
  path = target(REPORT_MD)
  with open(path, "w") as f:
    f.write(markdown(runs, pngs))
  for name in pngs + [REPORT_MD]:
    print(f"wrote {os.path.join(out_dir, name)}")
  return path


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m safe_dist.report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="*", metavar="WORKDIR", help="run directories")
  parser.add_argument("--root", default=None,
                      help="report every finished run (a folder with summary.json) in ROOT")
  parser.add_argument("--out", default=None,
                      help="output directory (default: the first WORKDIR's report/, or "
                           "ROOT/report)")
  args = parser.parse_args(argv)
  if bool(args.workdirs) == bool(args.root):
    parser.error("give either WORKDIRs or --root ROOT")
  workdirs = args.workdirs
  if args.root:
    try:
      workdirs = finished_workdirs(args.root)
    except FileNotFoundError as e:
      parser.error(str(e))
    if not workdirs:
      parser.error(f"--root {args.root!r} holds no finished run (a folder with {SUMMARY_FILE})")
  write_report(workdirs, args.out or (args.root and os.path.join(args.root, "report")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
