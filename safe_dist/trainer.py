"""The training loop: restore, step, log, evaluate, measure sharpness, checkpoint, finish.

`train_and_evaluate(experiment, workdir)` runs one experiment end to end and returns its
summary. What the loop runs is built by `run_setup.setup` (jitted, sharded functions), what
it evaluates by `evaluation`; the workdir's identity and JSON files are `workdir`'s.
"""

import contextlib
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging

from safe_dist import data as data_lib
from safe_dist import distributed
from safe_dist import evaluation
from safe_dist import monitoring
from safe_dist import sharding
from safe_dist import workdir as workdir_lib
from safe_dist.checkpointing import Checkpointer
from safe_dist.experiment import Experiment
from safe_dist.metric_writer import MetricWriter
from safe_dist.run_setup import Run, setup
from safe_dist.sparsity import sparse_iterate, weight_sparsity
from safe_dist.train_state import TrainState


# What every step returns that must stay finite: its loss and gradient norm (the step
# diverged), and the norm of the new parameters (the update overflowed them; a checkpoint of
# that state would be of no use).
FINITE_METRICS = ("train/loss", "optim/grad_norm", "optim/param_norm")


class NonFiniteError(FloatingPointError):
  """A step returned a non-finite loss, gradient norm or parameter norm (`step`: the first)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def _check_finite(steps_and_metrics: list[tuple[int, Any]]) -> None:
  """NonFiniteError naming the first step whose FINITE_METRICS are not all finite."""
  values = jax.device_get([{k: m[k] for k in FINITE_METRICS if k in m}
                           for _, m in steps_and_metrics])
  for (step, _), named in zip(steps_and_metrics, values):
    for name, value in named.items():
      if not np.isfinite(value):
        raise NonFiniteError(f"{name} is {float(value)} at step {step}", step)


def _make_train_iterator(exp: Experiment):
  return data_lib.train_iterator(
      exp.data, global_batch_size=exp.train.batch_size, seed=exp.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())


class _Progress:
  """Step rate and ETA for the console line, and the training time that budgets monitoring."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.last_step, self.last_time = total_steps, start_step, time.time()
    self.window_start, self.monitoring_seconds, self.window_steps = self.last_time, 0.0, 0

  @contextlib.contextmanager
  def monitoring(self, state):
    """Times a monitoring phase (after the steps in flight finish: they are training)."""
    jax.block_until_ready(state)
    start = time.time()
    yield
    self.monitoring_seconds += time.time() - start

  def training_seconds(self) -> float:
    """Wall time spent training since the last `new_window`, monitoring excluded."""
    return time.time() - self.window_start - self.monitoring_seconds

  def step_seconds(self) -> float:
    """Mean wall time of the steps since the last `new_window` (compilation included)."""
    return self.training_seconds() / max(self.window_steps, 1)

  def new_window(self) -> None:
    self.window_start, self.monitoring_seconds, self.window_steps = time.time(), 0.0, 0

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


def _log_evaluation(run: Run, state: TrainState, writer: MetricWriter, step: int,
                    should_stop: Callable[[], bool]) -> dict:
  """The task's rates of x (returned) and of Proj(x), and the sparsity of the method's
  iterate."""
  exp = run.exp
  projected = run.project(state.params)
  val = evaluation.evaluate(run, state.params, state.batch_stats, should_stop=should_stop)
  masked = evaluation.evaluate(run, projected, state.batch_stats, should_stop=should_stop)
  layers = monitoring.per_layer_sparsity(sparse_iterate(state.params, state.opt_state))
  writer.scalars(step, {**{f"val/{k}": v for k, v in val.items() if not k.startswith("num_")},
                        **{f"val/masked_{k}": masked[k] for k in ("accuracy", "perplexity")
                           if k in masked},
                        "sparsity/projected_weights": float(weight_sparsity(projected)),
                        "sparsity/target": exp.sparsifier.target_sparsity})
  writer.histogram(step, "sparsity/per_layer", list(layers.values()))
  writer.text(step, "sparsity/per_layer",
              monitoring.sparsity_table(layers, monitoring.layer_sizes(state.params)))
  writer.flush()
  shown = "perplexity" if "perplexity" in val else "accuracy"
  logging.info("step %d: val %s %.4f, masked (%.0f%%) %s %.4f", step, shown, val[shown],
               100 * exp.sparsifier.target_sparsity, shown, masked[shown])
  return val


def _held_out_batch(run: Run) -> dict:
  """The fixed batch of the sharpness estimates: the first test examples (also with
  --validation_examples: a measurement, not an evaluation, and never of training examples)."""
  dp = sharding.data_parallel_size(run.mesh)
  size = -(-run.exp.train.sharpness_batch_size // dp) * dp
  local = next(iter(data_lib.eval_batches(
      run.exp.data, batch_size=size, split="test", process_index=jax.process_index(),
      process_count=jax.process_count())))
  return sharding.global_batch(run.mesh, local)


def _log_sharpness(run: Run, state: TrainState, writer: MetricWriter, step: int, batch: dict,
                   budget_seconds: Optional[float], hvp_seconds_estimate: Optional[float],
                   should_stop: Callable[[], bool]) -> None:
  """Hessian sharpness of x and of Proj(x) within `budget_seconds` (half each; None: no
  limit)."""
  key = jax.random.PRNGKey(run.exp.train.seed)  # the same probe vectors at every step
  values = monitoring.sharpness_of_iterates(
      run.hessian_probe, state.params, run.project(state.params), state.batch_stats, batch,
      key, budget_seconds=budget_seconds, hvp_seconds_estimate=hvp_seconds_estimate,
      should_stop=should_stop)
  if values:
    writer.scalars(step, values)
    logging.info("step %d: %s", step, " ".join(f"{k.split('/')[-1]}={v:.4g}"
                                                for k, v in values.items()))


def _sharpness_budget(tc, progress: _Progress) -> tuple[Optional[float], Optional[float]]:
  """(seconds the next Hessian measurement may take, estimated seconds of one product)."""
  if tc.monitoring_share is None:
    return None, None
  # A Hessian-vector product costs about a (SAM) train step on as many examples. All
  # processes must decide alike (each product is a collective): process 0's clock.
  budget, estimate = distributed.from_first_process(np.array([
      tc.monitoring_share * progress.training_seconds(),
      progress.step_seconds() * tc.sharpness_batch_size / tc.batch_size]))
  return float(budget), float(estimate)


def train_and_evaluate(exp: Experiment, workdir: str, *, resume: bool = True,
                       stop_requested: Callable[[], bool] = lambda: False) -> dict:
  """Trains `exp` in `workdir` (resuming its latest checkpoint) and returns the summary.

  A stop request (`stop_requested()` turning True, e.g. on SIGTERM) ends the run within a
  step, an evaluation batch or a Hessian-vector product: the state of the last completed
  step is checkpointed and {"interrupted_at_step": step} is returned.
  """
  if exp.train.check_nans:
    jax.config.update("jax_debug_nans", True)
  workdir = os.path.abspath(workdir)  # orbax wants absolute paths
  holds_run = workdir_lib.check_workdir(exp, workdir)
  run = setup(exp)
  plan, tc = run.plan, exp.train
  os.makedirs(workdir, exist_ok=True)
  if not holds_run:
    workdir_lib.write_record(exp, workdir)

  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
  train_iter = _make_train_iterator(exp)
  state = checkpointer.restore_latest(run.abstract_state, train_iter) if resume else None
  if state is None:
    state = run.init(tc.seed)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info("resumed from the checkpoint of step %d in %s", start_step, workdir)

  writer = MetricWriter(os.path.join(workdir, "tensorboard"))
  should_stop = distributed.StopCheck(stop_requested)
  progress = _Progress(plan.total_steps, start_step)
  pending: list[tuple[int, Any]] = []
  logging.info("training %s on %s with %s: %d steps (%d per epoch) on mesh %s",
               exp.model.name, exp.data.name, exp.sparsifier.name, plan.total_steps,
               plan.steps_per_epoch, dict(run.mesh.shape))
  log_penalty_pull(run)

  def flush_metrics(keep_last: bool):
    # Fetch one step late so that logging never waits on the step in flight.
    nonlocal pending
    ready, pending = (pending[:-1], pending[-1:]) if keep_last else (pending, [])
    if not ready:
      return
    fetched = jax.device_get([m for _, m in ready])
    _check_finite([(s, m) for (s, _), m in zip(ready, fetched)])
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    step = ready[-1][0]
    mean["optim/lr"] = float(run.lr_fn(step - 1))
    rate = progress.step_rate(step)
    mean["perf/steps_per_sec"] = rate
    mean["perf/step_time"] = 1.0 / max(rate, 1e-9)
    mean["perf/examples_per_sec"] = rate * tc.batch_size
    writer.scalars(step, mean)
    logging.info(progress.line(step, rate, mean))

  held_out = _held_out_batch(run) if plan.sharpness_every_steps else None
  step, interrupted, evaluated = start_step, False, {}
  try:
    try:
      while step < plan.total_steps:
        state, metrics = run.train_step(state, sharding.global_batch(run.mesh, next(train_iter)))
        step += 1
        progress.window_steps += 1
        pending.append((step, metrics))
        if step % tc.log_every_steps == 0:
          flush_metrics(keep_last=True)
        if plan.fires(step, plan.eval_every_steps):
          flush_metrics(keep_last=False)
          with progress.monitoring(state):
            evaluated = {step: _log_evaluation(run, state, writer, step, should_stop)}
        if plan.fires(step, plan.sharpness_every_steps):
          flush_metrics(keep_last=False)
          budget, hvp_estimate = _sharpness_budget(tc, progress)
          with progress.monitoring(state):
            _log_sharpness(run, state, writer, step, held_out, budget, hvp_estimate,
                           should_stop)
          progress.new_window()
        if plan.fires(step, plan.checkpoint_every_steps):
          _check_finite(pending)  # never a checkpoint of a diverged state
          checkpointer.save(step, state, train_iter)
        if step < plan.total_steps and should_stop():
          interrupted = True
          break
    except distributed.Interrupted as stop:
      logging.warning("%s at step %d", stop, step)
      interrupted = True
    flush_metrics(keep_last=False)
  except NonFiniteError as e:
    checkpointer.wait()  # the saves of finite states in flight are committed
    last = checkpointer.latest_step()
    checkpointer.close()
    writer.close()
    kept = (f"the last checkpoint, of step {last}, is finite and kept" if last is not None
            else "no checkpoint was written")
    raise NonFiniteError(f"training stopped: {e} (the first non-finite value); {kept}",
                         e.step) from None
  if checkpointer.latest_step() != step:
    checkpointer.save(step, state, train_iter, force=True)
  checkpointer.wait()
  summary = None
  if not interrupted:
    try:
      summary = finalize(run, state, writer, should_stop, dense_rates=evaluated.get(step))
    except distributed.Interrupted as stop:  # the final checkpoint is committed: resume ends it
      logging.warning("%s after the last step", stop)
  checkpointer.close()
  if summary is None:
    writer.close()
    return {"interrupted_at_step": step}
  summary["steps"] = step
  workdir_lib.write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
  writer.close()
  return summary


# Below this pull the constraint gap stayed open in BUILD_NOTES.md's runs ("How strong the
# penalty must be"); P ~ 10 closed it, as the reference ResNet20x2 config's P = 10.1 does.
LOW_PENALTY_PULL, GOOD_PENALTY_PULL = 5.0, 10.0


def log_penalty_pull(run: Run) -> None:
  pull = run.penalty_pull
  if pull is None:
    return
  logging.info("penalty pull P = sum_t lr(t) lambda(t) / (1 - momentum) = %.3g (lambda %.4g)",
               pull, run.exp.sparsifier.lam)
  if 0 < pull < LOW_PENALTY_PULL:
    logging.warning(
        "the penalty's pull P = %.3g is low: the constraint gap ||x - z|| / ||x|| will likely "
        "stay open and the final hard projection cost accuracy; P ~ %g needs --lambda %.2g "
        "(or --penalty_pull %g) with this schedule (BUILD_NOTES.md, \"How strong the penalty "
        "must be\")", pull, GOOD_PENALTY_PULL, run.exp.sparsifier.lam * GOOD_PENALTY_PULL / pull,
        GOOD_PENALTY_PULL)


def finalize(run: Run, state: TrainState, writer: MetricWriter,
             should_stop: Callable[[], bool] = lambda: False,
             dense_rates: Optional[dict] = None) -> dict:
  """Hard projection, BN re-calibration, and the final numbers of the summary.

  dense_rates: the rates of x itself when the loop has just evaluated them.
  """
  exp = run.exp
  final = evaluation.final_network(run, state, should_stop)
  rates = evaluation.evaluate(run, final.params, final.batch_stats, should_stop=should_stop)
  dense = dense_rates or evaluation.evaluate(run, state.params, state.batch_stats,
                                             should_stop=should_stop)
  at_sparsity = evaluation.projected_accuracies(run, state, exp.eval_sparsities, should_stop)
  summary = {
      "model": exp.model.name,
      "dataset": exp.data.name,
      # Which split every val_* number is of: "validation" (held-out training examples,
      # --validation_examples) or "test".
      "eval_split": data_lib.eval_split(exp.data),
      "task": exp.task,
      "sparsifier": exp.sparsifier.name,
      "target_sparsity": exp.sparsifier.target_sparsity,
      "penalty_pull": run.penalty_pull,
      # The lambda in use: --lambda, or the one --penalty_pull resolved to.
      "lambda": exp.sparsifier.lam if exp.sparsifier.penalized else None,
      "weight_sparsity": final.description["weight_sparsity"],
      "bn_recalibrated": final.description["bn_recalibrated"],
      **{f"val_{k}": v for k, v in rates.items() if not k.startswith("num_")},
      "val_accuracy_before_projection": dense["accuracy"],
      "masked_accuracy_at": {s: row["accuracy_bn_recalibrated" if state.batch_stats
                                    else "accuracy"] for s, row in at_sparsity.items()},
  }
  if "perplexity" in rates:  # language models
    summary["perplexity"] = rates["perplexity"]
    summary["perplexity_before_projection"] = dense["perplexity"]
  step = int(jax.device_get(state.step))
  writer.scalars(step, {"final/val_accuracy": rates["accuracy"],
                        "final/weight_sparsity": summary["weight_sparsity"],
                        **({"final/perplexity": rates["perplexity"]} if "perplexity" in rates
                           else {})})
  return summary
