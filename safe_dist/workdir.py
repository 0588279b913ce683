"""A run's directory: its one identity record, the experiment it holds, JSON outputs.

`experiment.json` (written once, by the run that creates the workdir) is the run's identity:
a later run on the same workdir must describe the same experiment (up to cadence, placement
and paths), and the evaluation CLI rebuilds the experiment from it.
"""

import dataclasses
import json
import os
import types
import typing
from typing import Any

import jax

from safe_dist.experiment import Experiment

EXPERIMENT_FILE = "experiment.json"
SUMMARY_FILE = "summary.json"
# Fields that may differ when a run is resumed or evaluated: cadence, placement and paths,
# not the math.
RESUMABLE_DIFFERENCES = ("mesh", "data.data_dir", "train.log_every_steps",
                         "train.keep_checkpoints", "train.checkpoint_every_epoch",
                         "train.checkpoint_every_steps", "train.check_nans",
                         "train.eval_every_epochs", "train.sharpness_every_epochs",
                         "train.sharpness_batch_size", "train.sharpness_iters",
                         "train.sharpness_samples", "train.monitoring_share",
                         "eval_sparsities")


def experiment_record(exp: Experiment) -> dict:
  """{"section.field": value} of `exp` (tuples as lists: the JSON form)."""
  out = {}

  def flatten(d: dict, prefix: str):
    for k, v in d.items():
      if isinstance(v, dict):
        flatten(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  flatten(dataclasses.asdict(exp), "")
  return out


def _is_resumable(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in RESUMABLE_DIFFERENCES)


def differences(stored: dict, mine: dict) -> list[str]:
  """The record keys whose values differ, other than the resumable ones. A key the stored
  record lacks (a field added since it was written) counts as that field's default."""
  defaults = experiment_record(Experiment())
  return sorted(k for k in set(stored) | set(mine)
                if stored.get(k, defaults.get(k)) != mine.get(k) and not _is_resumable(k))


def read_record(workdir: str) -> dict | None:
  path = os.path.join(workdir, EXPERIMENT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_workdir(exp: Experiment, workdir: str) -> bool:
  """True if `workdir` holds this experiment already; raises if it holds a different one."""
  stored = read_record(workdir)
  if stored is None:
    return False
  mine = experiment_record(exp)
  differ = differences(stored, mine)
  if differ:
    details = ", ".join(f"{k}: {stored.get(k)!r} -> {mine.get(k)!r}" for k in differ[:8])
    raise ValueError(f"--workdir {workdir} holds a different run ({details}); nothing was "
                     "changed there. Use a new --workdir for a new experiment.")
  return True


def _from_json(cls, value):
  """`value` (JSON form) as an instance of the annotated type `cls`."""
  if value is None:
    return None
  if typing.get_origin(cls) in (typing.Union, types.UnionType):  # Optional[SomeConfig]
    cls = next((c for c in typing.get_args(cls) if dataclasses.is_dataclass(c)), cls)
  if dataclasses.is_dataclass(cls):
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _from_json(hints[f.name], value[f.name])
                  for f in dataclasses.fields(cls) if f.name in value})
  if isinstance(value, list):
    return tuple(value)
  return value


def stored_experiment(workdir: str) -> Experiment:
  """The experiment of the run in `workdir` (ValueError if there is none)."""
  stored = read_record(workdir)
  if stored is None:
    raise ValueError(f"--workdir {workdir} holds no run (no {EXPERIMENT_FILE})")
  nested: dict[str, Any] = {}
  for key, value in stored.items():
    *parents, leaf = key.split(".")
    node = nested
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return _from_json(Experiment, nested)


def write_record(exp: Experiment, workdir: str) -> None:
  write_json(os.path.join(workdir, EXPERIMENT_FILE), experiment_record(exp))


def write_json(path: str, obj: Any) -> None:
  """Atomically (write, then rename) on process 0; a no-op on the others."""
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
