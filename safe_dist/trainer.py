"""SAFE training on a device mesh: mesh, data, model and optimizer, shardings, step, restore, loop.

`train_and_evaluate(experiment, workdir)` runs one experiment end to end and returns its
summary. Everything is global-array `jax.jit` with explicit shardings: the same code runs on
one CPU, on 8 fake devices, and on many hosts.
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from safe_dist import data as data_lib
from safe_dist import distributed
from safe_dist import monitoring
from safe_dist import optim
from safe_dist import sharding
from safe_dist import steps as steps_lib
from safe_dist.checkpointing import Checkpointer, abstract_like
from safe_dist.experiment import Experiment
from safe_dist.metric_writer import MetricWriter
from safe_dist.sparsity import (make_optimizer, penalty_schedule, prunable_shardings,
                                weight_sparsity)
from safe_dist.train_state import TrainState

EXPERIMENT_FILE = "experiment.json"
SUMMARY_FILE = "summary.json"
# Fields that may differ when a run is resumed: cadence, placement and paths, not the math.
_RESUMABLE_DIFFERENCES = {"mesh", "data.data_dir", "train.log_every_steps",
                          "train.keep_checkpoints", "train.checkpoint_every_epoch",
                          "train.checkpoint_every_steps", "train.check_nans",
                          "train.eval_every_epochs", "train.sharpness_every_epochs",
                          "train.sharpness_batch_size", "train.sharpness_iters",
                          "train.sharpness_samples", "eval_sparsities"}


# ---------------------------------------------------------------------------------------------
# Run identity: a workdir holds one experiment.

def _flatten(d: dict, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def experiment_record(exp: Experiment) -> dict:
  return _flatten(dataclasses.asdict(exp))


def check_workdir(exp: Experiment, workdir: str) -> bool:
  """True if `workdir` holds this experiment already; raises if it holds a different one."""
  path = os.path.join(workdir, EXPERIMENT_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    stored = json.load(f)
  mine = experiment_record(exp)
  differ = sorted(k for k in set(stored) | set(mine)
                  if stored.get(k) != mine.get(k)
                  and not any(k == f or k.startswith(f + ".") for f in _RESUMABLE_DIFFERENCES))
  if differ:
    details = ", ".join(f"{k}: {stored.get(k)!r} -> {mine.get(k)!r}" for k in differ[:8])
    raise ValueError(f"--workdir {workdir} holds a different run ({details}); nothing was "
                     "changed there. Use a new --workdir for a new experiment.")
  return True


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Data as global arrays.

def global_batch(mesh, local_batch: dict) -> dict:
  """A global array sharded over the data axes from this process's rows of the batch."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, np.asarray(v))
          for k, v in local_batch.items()}


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """All of a run's lengths in one unit, steps (epochs are converted here, at the edge)."""
  steps_per_epoch: int
  total_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  sharpness_every_steps: int  # 0: never

  def fires(self, step: int, every: int) -> bool:
    return every > 0 and (step % every == 0 or step == self.total_steps)


def make_plan(exp: Experiment, num_train: int) -> RunPlan:
  tc = exp.train
  steps_per_epoch = num_train // tc.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"--batch_size {tc.batch_size} is larger than the {num_train} training "
                     "examples")
  total = tc.max_steps or max(int(round(tc.num_epochs * steps_per_epoch)), 1)
  eval_every = max(int(round(tc.eval_every_epochs * steps_per_epoch)), 1)
  ckpt_every = tc.checkpoint_every_steps or tc.checkpoint_every_epoch * steps_per_epoch
  sharpness_every = (max(int(round(tc.sharpness_every_epochs * steps_per_epoch)), 1)
                     if tc.sharpness_every_epochs > 0 else 0)
  return RunPlan(steps_per_epoch, total, eval_every, ckpt_every, sharpness_every)


# ---------------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class Run:
  """What `setup` builds for a workdir: mesh, model, jitted functions and the initial state."""
  exp: Experiment
  mesh: Any
  info: Any
  plan: RunPlan
  model: nn.Module
  lr_fn: Callable
  state_shardings: Any
  param_shardings: Any
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_step: Callable
  project: Callable
  sharpness: Callable  # (params, batch_stats, batch, key) -> Hessian max eigenvalue and trace
  projection: Any  # the sparsifier's Projection, carrying the shardings of the kernels


def validate(exp: Experiment, mesh) -> None:
  """Checks that need the mesh, before any work."""
  dp = sharding.data_parallel_size(mesh)
  if exp.train.batch_size % dp:
    raise ValueError(f"--batch_size {exp.train.batch_size} must be divisible by the "
                     f"data-parallel size {dp} (mesh data x fsdp)")
  if exp.train.batch_size % jax.process_count():
    raise ValueError(f"--batch_size {exp.train.batch_size} must be divisible by the number of "
                     f"processes {jax.process_count()}")


def setup(exp: Experiment, devices=None) -> Run:
  mesh = sharding.make_mesh(exp.mesh, devices)
  validate(exp, mesh)
  info = data_lib.dataset_info(exp.data.name, exp.data.data_dir)
  num_train = min(info.num_train, exp.data.max_train_examples or info.num_train)
  plan = make_plan(exp, num_train)
  model = exp.model.build(info.num_classes, info.mean, info.std, exp.train.half_precision)
  lr_fn = optim.learning_rate_schedule(exp.optimizer, plan.steps_per_epoch, plan.total_steps)
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))
  param_shardings = sharding.shardings_for(boxed["params"], mesh)
  # The projection runs per shard of the prunable kernels (no gather of the weights).
  score_shardings = prunable_shardings(nn.unbox(boxed["params"]), param_shardings)
  projection = dataclasses.replace(exp.sparsifier.projection, shardings=score_shardings)
  tx = make_optimizer(exp.sparsifier, optim.make_base_optimizer(exp.optimizer, lr_fn),
                      plan.total_steps, shardings=score_shardings)

  def init(seed: int) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(key)
    variables = nn.unbox(model.init(init_key, dummy, train=False))
    params = variables["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=state_key)

  abstract = jax.eval_shape(init, 0)
  state_shardings = sharding.shardings_like_params(abstract, abstract.params, param_shardings,
                                                   mesh)
  state_shardings = state_shardings.replace(params=param_shardings)
  sharding.log_sharding_summary(abstract.params, param_shardings)

  batch_spec = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  sp = exp.sparsifier
  train_step = jax.jit(
      steps_lib.make_train_step(model, tx, sp.uses_admm, sp.uses_sam, sp.needs_input_norms),
      in_shardings=(state_shardings, batch_spec), out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  eval_step = jax.jit(steps_lib.make_eval_step(model),
                      in_shardings=(param_shardings, replicated, batch_spec),
                      out_shardings=replicated)

  @functools.lru_cache(maxsize=None)
  def projector(sparsity: Optional[float]):
    return jax.jit(lambda p: projection.project_params(p, sparsity),
                   in_shardings=(param_shardings,), out_shardings=param_shardings)

  def project(params, sparsity: Optional[float] = None):
    return projector(sparsity)(params)
  sharpness = monitoring.make_sharpness(
      model, param_shardings, state_shardings.batch_stats, batch_spec, replicated,
      exp.train.sharpness_iters, exp.train.sharpness_samples)
  return Run(exp, mesh, info, plan, model, lr_fn, state_shardings, param_shardings,
             abstract_like(abstract, state_shardings),
             jax.jit(init, static_argnums=(0,), out_shardings=state_shardings),
             train_step, eval_step, project, sharpness, projection)


def add_sums(totals: Optional[dict], sums: dict) -> dict:
  """Running total of `eval_step` outputs (None to start)."""
  return sums if totals is None else jax.tree.map(jnp.add, totals, sums)


def rates(totals: dict) -> dict:
  """Accuracy and mean loss from summed `eval_step` outputs (padding has weight 0)."""
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
          "num_examples": int(round(float(totals["count"])))}


def evaluate_batches(run: Run, params, batch_stats, batches) -> dict:
  """Accuracy and loss over global batches {"image", "label", "weight"}."""
  totals = None
  for batch in batches:
    totals = add_sums(totals, run.eval_step(params, batch_stats, batch))
  return rates(totals)


def evaluate(run: Run, params, batch_stats, split="test") -> dict:
  """Accuracy and loss over the whole evaluation split (padding weighted out)."""
  exp = run.exp
  dp = sharding.data_parallel_size(run.mesh)
  batch_size = math.ceil(exp.train.eval_batch_size / dp) * dp
  local_batches = data_lib.make_eval_batches(
      exp.data.name, batch_size=batch_size, split=split, data_dir=exp.data.data_dir,
      max_examples=exp.data.max_eval_examples, process_index=jax.process_index(),
      process_count=jax.process_count())
  return evaluate_batches(run, params, batch_stats,
                          (global_batch(run.mesh, local) for local in local_batches))


def final_network(run: Run, state: TrainState) -> tuple[Any, Any]:
  """(params, batch_stats) of the network a run delivers: Proj_d(x) (x for `none`), with
  BatchNorm statistics re-calibrated where the model has BN."""
  params = (state.params if run.exp.sparsifier.name == "none"
            else run.project(state.params, None))
  return params, recalibrate_batch_stats(run, params, state.batch_stats)


def recalibrate_batch_stats(run: Run, params, batch_stats):
  """Re-estimates BN running statistics of `params` over `bnt_sample_size` training samples."""
  exp = run.exp
  if not batch_stats or exp.train.bnt_sample_size == 0:
    return batch_stats
  num_batches = max(exp.train.bnt_sample_size // exp.train.batch_size, 1)
  iterator = data_lib.make_train_iterator(
      exp.data.name, global_batch_size=exp.train.batch_size, seed=exp.train.seed + 1,
      data_dir=exp.data.data_dir, augment=False, max_examples=exp.data.max_train_examples,
      process_index=jax.process_index(), process_count=jax.process_count())
  stats_step = jax.jit(steps_lib.make_batch_stats_step(run.model))
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)
  per_batch = [stats_step(params, zeros, global_batch(run.mesh, next(iterator)))
               for _ in range(num_batches)]
  return steps_lib.average_trees(per_batch)


def _make_train_iterator(exp: Experiment):
  return data_lib.make_train_iterator(
      exp.data.name, global_batch_size=exp.train.batch_size, seed=exp.train.seed,
      data_dir=exp.data.data_dir, label_noise_ratio=exp.data.label_noise_ratio,
      augment=exp.data.augment, max_examples=exp.data.max_train_examples,
      process_index=jax.process_index(), process_count=jax.process_count())


class _Progress:
  """A console line every `every` steps with the step rate and ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.last_step, self.last_time = total_steps, start_step, time.time()
    self.start_time = self.last_time

  def step_rate(self, step: int) -> float:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return rate

  def line(self, step: int, rate: float, values: dict) -> str:
    eta = (self.total - step) / max(rate, 1e-9)
    shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items()
                     if k in ("train/loss", "train/accuracy", "sharpness/sam", "sparsity/z"))
    return f"step {step}/{self.total} ({rate:.1f} steps/s, ETA {eta / 60:.1f} min) {shown}"


# With several processes a signal may reach them at different steps: they agree every this
# many steps (one tiny all-gather) so that all stop at the same step boundary.
STOP_CHECK_EVERY_STEPS = 10


def _should_stop(stop_requested: Callable[[], bool], step: int) -> bool:
  if jax.process_count() == 1:
    return stop_requested()
  return step % STOP_CHECK_EVERY_STEPS == 0 and distributed.any_process(stop_requested())


def _log_evaluation(run: Run, state: TrainState, writer: MetricWriter, step: int) -> None:
  """Validation accuracy of x and of Proj(x), and the sparsity of the method's iterate."""
  sp = run.exp.sparsifier
  projected = run.project(state.params, None)
  val = evaluate(run, state.params, state.batch_stats)
  masked = evaluate(run, projected, state.batch_stats)
  iterate = monitoring.sparse_iterate(state.params, state.opt_state, sp.uses_admm)
  layers = monitoring.per_layer_sparsity(iterate)
  writer.scalars(step, {"val/accuracy": val["accuracy"], "val/loss": val["loss"],
                        "val/masked_accuracy": masked["accuracy"],
                        "sparsity/projected_weights": float(weight_sparsity(projected)),
                        "sparsity/target": sp.target_sparsity})
  writer.histogram(step, "sparsity/per_layer", list(layers.values()))
  writer.text(step, "sparsity/per_layer",
              monitoring.sparsity_table(layers, monitoring.layer_sizes(state.params)))
  writer.flush()
  logging.info("step %d: val accuracy %.4f, masked (%.0f%%) accuracy %.4f", step,
               val["accuracy"], 100 * sp.target_sparsity, masked["accuracy"])


def _held_out_batch(run: Run) -> dict:
  """The fixed batch of the sharpness estimates: the first test examples."""
  dp = sharding.data_parallel_size(run.mesh)
  size = math.ceil(run.exp.train.sharpness_batch_size / dp) * dp
  local = next(iter(data_lib.make_eval_batches(
      run.exp.data.name, batch_size=size, split="test", data_dir=run.exp.data.data_dir,
      max_examples=run.exp.data.max_eval_examples, process_index=jax.process_index(),
      process_count=jax.process_count())))
  return global_batch(run.mesh, local)


def _log_sharpness(run: Run, state: TrainState, writer: MetricWriter, step: int,
                   batch: dict) -> None:
  key = jax.random.PRNGKey(run.exp.train.seed)  # the same probe vectors at every step
  values = monitoring.sharpness_metrics(run.sharpness, state.params,
                                        run.project(state.params, None), state.batch_stats,
                                        batch, key)
  writer.scalars(step, values)
  logging.info("step %d: %s", step, " ".join(f"{k.split('/')[-1]}={v:.4g}"
                                              for k, v in values.items()))


def train_and_evaluate(exp: Experiment, workdir: str, *, resume: bool = True,
                       config_json: Optional[str] = None,
                       stop_requested: Callable[[], bool] = lambda: False) -> dict:
  """Trains `exp` in `workdir` (resuming its latest checkpoint) and returns the summary."""
  if exp.train.check_nans:
    jax.config.update("jax_debug_nans", True)
  workdir = os.path.abspath(workdir)  # orbax wants absolute paths
  holds_run = check_workdir(exp, workdir)
  record = experiment_record(exp)
  run = setup(exp)
  plan, sp = run.plan, exp.sparsifier
  os.makedirs(workdir, exist_ok=True)
  if not holds_run:
    _write_json(os.path.join(workdir, EXPERIMENT_FILE), experiment_record(exp))
  if config_json is not None and jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_json)

  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=exp.train.keep_checkpoints)
  train_iter = _make_train_iterator(exp)
  state = checkpointer.restore_latest(run.abstract_state, train_iter) if resume else None
  if state is None:
    state = run.init(exp.train.seed)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info("resumed from the checkpoint of step %d in %s", start_step, workdir)

  writer = MetricWriter(os.path.join(workdir, "tensorboard"))
  lam_fn = penalty_schedule(sp.lam, sp.lambda_schedule, plan.total_steps)
  progress = _Progress(plan.total_steps, start_step)
  pending: list[tuple[int, Any]] = []
  interrupted = False
  logging.info("training %s on %s with %s: %d steps (%d per epoch) on mesh %s",
               exp.model.name, exp.data.name, sp.name, plan.total_steps, plan.steps_per_epoch,
               dict(run.mesh.shape))

  def flush_metrics(keep_last: bool):
    # Fetch one step late so that logging never waits on the step in flight.
    nonlocal pending
    ready, pending = (pending[:-1], pending[-1:]) if keep_last else (pending, [])
    if not ready:
      return
    fetched = jax.device_get([m for _, m in ready])
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    step = ready[-1][0]
    if exp.train.check_nans and not np.isfinite(mean["train/loss"]):
      raise FloatingPointError(f"train/loss is {mean['train/loss']} at step {step}")
    mean["optim/lr"] = float(run.lr_fn(step - 1))
    if sp.uses_admm:
      mean["admm/lambda"] = float(lam_fn(step - 1))
    rate = progress.step_rate(step)
    mean["perf/steps_per_sec"] = rate
    mean["perf/step_time"] = 1.0 / max(rate, 1e-9)
    mean["perf/examples_per_sec"] = rate * exp.train.batch_size
    writer.scalars(step, mean)
    logging.info(progress.line(step, rate, mean))

  held_out = _held_out_batch(run) if plan.sharpness_every_steps else None
  step = start_step
  while step < plan.total_steps:
    batch = global_batch(run.mesh, next(train_iter))
    state, metrics = run.train_step(state, batch)
    step += 1
    pending.append((step, metrics))
    if step % exp.train.log_every_steps == 0:
      flush_metrics(keep_last=True)
    if plan.fires(step, plan.eval_every_steps):
      flush_metrics(keep_last=False)
      _log_evaluation(run, state, writer, step)
    if plan.fires(step, plan.sharpness_every_steps):
      flush_metrics(keep_last=False)
      _log_sharpness(run, state, writer, step, held_out)
    if plan.fires(step, plan.checkpoint_every_steps):
      checkpointer.save(step, state, train_iter, config=record)
    if _should_stop(stop_requested, step) and step < plan.total_steps:
      interrupted = True
      break
  flush_metrics(keep_last=False)
  if checkpointer.latest_step() != step:
    checkpointer.save(step, state, train_iter, force=True, config=record)
  checkpointer.wait()
  if interrupted:
    checkpointer.close()
    writer.close()
    return {"interrupted_at_step": step}

  summary = finalize(run, state, writer)
  summary["steps"] = step
  _write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  checkpointer.close()
  writer.close()
  return summary


def finalize(run: Run, state: TrainState, writer: MetricWriter) -> dict:
  """Hard projection, BN re-calibration, and the final numbers of the summary."""
  exp, sp = run.exp, run.exp.sparsifier
  params, batch_stats = final_network(run, state)
  final = evaluate(run, params, batch_stats)
  dense = evaluate(run, state.params, state.batch_stats)
  at_sparsity = {}
  for s in exp.eval_sparsities:
    projected = run.project(state.params, float(s))
    stats = recalibrate_batch_stats(run, projected, state.batch_stats)
    at_sparsity[f"{s:g}"] = evaluate(run, projected, stats)["accuracy"]
  summary = {
      "model": exp.model.name,
      "dataset": exp.data.name,
      "sparsifier": sp.name,
      "target_sparsity": sp.target_sparsity,
      "weight_sparsity": float(weight_sparsity(params)),
      "val_accuracy": final["accuracy"],
      "val_loss": final["loss"],
      "val_accuracy_before_projection": dense["accuracy"],
      "bn_recalibrated": bool(state.batch_stats) and exp.train.bnt_sample_size > 0,
      "masked_accuracy_at": at_sparsity,
  }
  step = int(jax.device_get(state.step))
  writer.scalars(step, {"final/val_accuracy": final["accuracy"],
                        "final/weight_sparsity": summary["weight_sparsity"]})
  return summary
