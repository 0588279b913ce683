"""Pure step functions over explicit state: train, evaluate, re-estimate BatchNorm statistics.

They are jitted by the trainer with explicit shardings; nothing here reads a config.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity import importance, prunable_leaves
from safe_dist.sparsity.admm import auxiliary_and_dual, find_admm_state
from safe_dist.train_state import TrainState

# flax BatchNorm keeps running = momentum * running + (1 - momentum) * batch (models use 0.9).
BN_MOMENTUM = 0.9


def cross_entropy(logits, labels, weights=None):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  if weights is None:
    return losses.mean()
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _tree_sq_norm(leaves):
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def admm_metrics(params, opt_state) -> dict[str, jax.Array]:
  """Sparsity of z, relative primal residual ||x - z|| / ||x|| and ||u||, over prunable kernels."""
  admm_state = find_admm_state(opt_state)
  z, u = (jax.tree.leaves(t) for t in auxiliary_and_dual(admm_state))
  x = prunable_leaves(params)
  gap = jnp.sqrt(_tree_sq_norm([a - b for a, b in zip(x, z)]))
  return {
      "sparsity/z": sum(jnp.sum(a == 0) for a in z) / sum(a.size for a in z),
      "admm/constraint_gap": gap / jnp.sqrt(_tree_sq_norm(x)),
      "admm/primal_residual": gap,
      "admm/dual_norm": jnp.sqrt(_tree_sq_norm(u)),
      "admm/mask_change": admm_state.mask_change,
      "admm/dual_residual": admm_state.dual_residual,
  }


def make_train_step(model: nn.Module, tx: optax.GradientTransformationExtraArgs,
                    uses_admm: bool, uses_sam: bool, needs_input_norms: bool = False
                    ) -> Callable:
  """train_step(state, batch) -> (state, metrics); one SAM/ADMM/... step on the global batch.

  needs_input_norms: record each layer's mean squared input in the first forward pass and
  pass it to `tx.update` as `input_sq_norms=` (SAFE+ with activation importance).
  """

  def loss_fn(params, batch_stats, batch, record_inputs=False):
    mutable = ["batch_stats"] if batch_stats else []
    apply = model.apply
    if record_inputs:
      apply, mutable = importance.recording_inputs(model.apply), mutable + ["intermediates"]
    logits, new_vars = apply(_variables(params, batch_stats), batch["image"], train=True,
                             mutable=mutable)
    return cross_entropy(logits, batch["label"]), (logits, new_vars)

  def train_step(state: TrainState, batch):
    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, needs_input_norms)
    extra = {}
    if needs_input_norms:
      extra["input_sq_norms"] = jax.lax.stop_gradient(
          importance.input_sq_norms(state.params, new_vars["intermediates"]))

    def perturbed_value_and_grad(params):
      # Batch statistics, but the running statistics are written by the first pass only.
      return jax.value_and_grad(lambda p: loss_fn(p, state.batch_stats, batch)[0])(params)

    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   value_and_grad_fn=perturbed_value_and_grad, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss,
        "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "optim/grad_norm": optax.tree.norm(grads),
        "optim/update_norm": optax.tree.norm(updates),
        "optim/param_norm": optax.tree.norm(params),
    }
    if uses_sam:
      metrics["sharpness/sam"] = optax.tree.get(opt_state, "perturbed_loss") - loss
    if uses_admm:
      metrics.update(admm_metrics(params, opt_state))
    else:  # the sparse iterate is x itself (masked in place by GMP, IHT, magnitude)
      kernels = prunable_leaves(params)
      metrics["sparsity/z"] = sum(jnp.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=new_vars.get("batch_stats", state.batch_stats))
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """eval_step(params, batch_stats, batch) -> sums of correct, loss and weight over the batch."""

  def eval_step(params, batch_stats, batch):
    logits = model.apply(_variables(params, batch_stats), batch["image"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             batch["label"])
    w = batch["weight"]
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * w), "loss": jnp.sum(losses * w), "count": jnp.sum(w)}

  return eval_step


def make_batch_stats_step(model: nn.Module) -> Callable:
  """batch_stats_step(params, zero_stats, batch) -> the batch's own BN mean and variance.

  Starting from zero running statistics, flax writes (1 - momentum) * batch statistic.
  """

  def batch_stats_step(params, zero_stats, batch):
    _, new_vars = model.apply(_variables(params, zero_stats), batch["image"], train=True,
                              mutable=["batch_stats"])
    return jax.tree.map(lambda s: s / (1.0 - BN_MOMENTUM), new_vars["batch_stats"])

  return batch_stats_step


def average_trees(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
