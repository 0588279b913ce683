"""Pure step functions over explicit state: train, evaluate, re-estimate BatchNorm statistics.

They are jitted by `run_setup` with explicit shardings; nothing here reads a config. The
task (`safe_dist.tasks`) owns the batch layout, the loss and the metrics; the sparsifier
reports its own metrics from the optimizer state (`sparsity.sparsifier_metrics`).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import optax

from safe_dist.sparsity import importance, sparsifier_metrics
from safe_dist.tasks import Task, model_variables
from safe_dist.train_state import TrainState

# flax BatchNorm keeps running = momentum * running + (1 - momentum) * batch (models use 0.9).
BN_MOMENTUM = 0.9


def make_train_step(model: nn.Module, task: Task, tx: optax.GradientTransformationExtraArgs,
                    record_input_norms: bool = False) -> Callable:
  """train_step(state, batch) -> (state, metrics); one optimizer step on the global batch.

  `tx.update` gets `value_and_grad_fn=` (the loss gradient at other params: SAM) and, with
  record_input_norms, `input_sq_norms=` (each layer's mean squared input, recorded in the
  first forward pass: SAFE+ with activation importance).
  """

  def loss_fn(params, batch_stats, batch, record_inputs=False):
    mutable = ["batch_stats"] if batch_stats else []
    apply = model.apply
    if record_inputs:
      apply, mutable = importance.recording_inputs(model.apply), mutable + ["intermediates"]
    logits, new_vars = apply(model_variables(params, batch_stats), task.inputs(batch),
                             train=True, mutable=mutable)
    loss, metrics = task.loss_and_metrics(logits, batch)
    return loss, (metrics, new_vars)

  def train_step(state: TrainState, batch):
    (loss, (metrics, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, record_input_norms)
    extra = {}
    if record_input_norms:
      extra["input_sq_norms"] = jax.lax.stop_gradient(
          importance.input_sq_norms(state.params, new_vars["intermediates"]))

    def perturbed_value_and_grad(params):
      # Batch statistics, but the running statistics are written by the first pass only.
      return jax.value_and_grad(lambda p: loss_fn(p, state.batch_stats, batch)[0])(params)

    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   value_and_grad_fn=perturbed_value_and_grad, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss, **metrics,
        "optim/grad_norm": optax.tree.norm(grads),
        "optim/update_norm": optax.tree.norm(updates),
        "optim/param_norm": optax.tree.norm(params),
        **sparsifier_metrics(params, opt_state),
    }
    perturbed_loss = optax.tree.get(opt_state, "perturbed_loss")
    if perturbed_loss is not None:  # SAM ran: its sharpness f(x + e) - f(x) comes for free
      metrics["sharpness/sam"] = perturbed_loss - loss
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=new_vars.get("batch_stats", state.batch_stats))
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, task: Task) -> Callable:
  """eval_step(params, batch_stats, batch) -> the task's weighted sums over the batch."""

  def eval_step(params, batch_stats, batch):
    logits = model.apply(model_variables(params, batch_stats), task.inputs(batch), train=False)
    return task.eval_sums(logits, batch)

  return eval_step


def make_batch_stats_step(model: nn.Module, task: Task) -> Callable:
  """batch_stats_step(params, zero_stats, batch) -> the batch's own BN mean and variance.

  Starting from zero running statistics, flax writes (1 - momentum) * batch statistic.
  """

  def batch_stats_step(params, zero_stats, batch):
    _, new_vars = model.apply(model_variables(params, zero_stats), task.inputs(batch),
                              train=True, mutable=["batch_stats"])
    return jax.tree.map(lambda s: s / (1.0 - BN_MOMENTUM), new_vars["batch_stats"])

  return batch_stats_step


def average_trees(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
