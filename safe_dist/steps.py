"""Pure step functions over explicit state: train, evaluate, re-estimate BatchNorm statistics.

They are jitted by `run_setup` with explicit shardings; nothing here reads a config. The
task (`safe_dist.tasks`) owns the batch layout, the loss and the metrics; the sparsifier
reports its own metrics from the optimizer state (`sparsity.sparsifier_metrics`).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import optax

from safe_dist.sharding import GroupLayout
from safe_dist.sparsity import group_mean, importance, sparsifier_metrics
from safe_dist.tasks import Task, model_variables
from safe_dist.train_state import TrainState

# flax BatchNorm keeps running = momentum * running + (1 - momentum) * batch (models use 0.9).
BN_MOMENTUM = 0.9


def make_train_step(model: nn.Module, task: Task, tx: optax.GradientTransformationExtraArgs,
                    record_input_norms: bool = False,
                    sam_groups: Optional[GroupLayout] = None) -> Callable:
  """train_step(state, batch) -> (state, metrics); one optimizer step on the global batch.

  `tx.update` gets `value_and_grad_fn=` (the loss gradient at other params: SAM) and, with
  record_input_norms, `input_sq_norms=` (each layer's mean squared input, recorded in the
  first forward pass: SAFE+ with activation importance).

  sam_groups (m-sharpness): every pass runs per group of the batch (vmapped, laid out by
  `sam_groups`), as if each group were alone on its own device: the loss, the metrics, the
  gradient at x and the BatchNorm running statistics are means over groups (BatchNorm
  normalises each group with the group's own batch statistics, in both passes); `tx.update`
  also gets `group_grads=` (each group's gradient at x) and a `value_and_grad_fn` over the
  stacked per-group points (see `safe_dist.sparsity.sam`).
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

  def first_pass(params, batch_stats, batch):
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch,
                                                     record_input_norms)

  def perturbed_value_and_grad(batch_stats, batch):
    # Batch statistics, but the running statistics are written by the first pass only.
    return lambda params: jax.value_and_grad(lambda p: loss_fn(p, batch_stats, batch)[0])(params)

  def grouped(state: TrainState, batch):
    """The first pass per group (means over groups) and the SAM arguments of m-sharpness."""
    groups = sam_groups.split(batch)
    (losses, aux), group_grads = jax.vmap(first_pass, in_axes=(None, None, 0))(
        state.params, state.batch_stats, groups)
    group_grads = sam_groups.spread(group_grads)
    loss, aux, grads = group_mean((losses, aux, group_grads))

    def per_group_value_and_grad(points):
      one_group = lambda point, group: perturbed_value_and_grad(state.batch_stats, group)(point)
      losses, grads = jax.vmap(one_group)(sam_groups.spread(points), groups)
      return losses, sam_groups.spread(grads)

    return (loss, aux), grads, {"value_and_grad_fn": per_group_value_and_grad,
                                "group_grads": group_grads}

  def train_step(state: TrainState, batch):
    if sam_groups is None:
      (loss, (metrics, new_vars)), grads = first_pass(state.params, state.batch_stats, batch)
      extra = {"value_and_grad_fn": perturbed_value_and_grad(state.batch_stats, batch)}
    else:
      (loss, (metrics, new_vars)), grads, extra = grouped(state, batch)
    if record_input_norms:
      extra["input_sq_norms"] = jax.lax.stop_gradient(
          importance.input_sq_norms(state.params, new_vars["intermediates"]))

    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
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
