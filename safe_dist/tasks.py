"""What a model is trained to do: its inputs, loss, metrics and evaluation sums.

The trainer, the evaluation, the sharpness probes and the attacks see a model only through a
`Task`, so the same step, checkpoints, shardings and sparsifiers serve image classification
and decoder language models. Every batch may carry a `weight` per example (0 for padding);
evaluation adds per-batch sums (`eval_sums`) across batches and the task turns the totals
into rates (`rates`).
"""

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def model_variables(params, batch_stats) -> dict:
  """The flax variables of `params` and BatchNorm statistics (`{}` for models without BN)."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


class Task:
  """A task's batch layout, loss and metrics; subclasses give `per_example` and `rates`."""
  name: str
  input_key: str
  input_dtype: type

  def dummy_input(self, shape) -> jax.Array:
    """A one-example model input of `shape` (without the batch axis), for `model.init`."""
    return jnp.zeros((1, *shape), self.input_dtype)

  def inputs(self, batch):
    """What the model reads from `batch`."""
    return batch[self.input_key]

  def per_example(self, logits, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, correct, weight) per prediction (weight 0: padding)."""
    raise NotImplementedError

  def rates(self, totals: dict) -> dict:
    """The reported numbers from summed `eval_sums`."""
    raise NotImplementedError

  def loss_and_metrics(self, logits, batch) -> tuple[jax.Array, dict]:
    """The training loss (weighted mean) and the train metrics of one batch."""
    losses, correct, weight = self.per_example(logits, batch)
    return weighted_mean(losses, weight), {"train/accuracy": weighted_mean(correct, weight)}

  def eval_sums(self, logits, batch) -> dict:
    """Weighted sums over a batch: {"correct", "loss", "count"} (added across batches)."""
    losses, correct, weight = self.per_example(logits, batch)
    return {"correct": jnp.sum(correct * weight), "loss": jnp.sum(losses * weight),
            "count": jnp.sum(weight)}


def weighted_mean(values, weights):
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class ClassificationTask(Task):
  """Images to class labels: batch {"image", "label"[, "weight"]}; cross-entropy, accuracy."""
  name = "classification"
  input_key = "image"
  input_dtype = jnp.float32

  def per_example(self, logits, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return losses, correct, batch.get("weight", jnp.ones_like(losses))

  def rates(self, totals):
    """{"accuracy", "loss", "num_examples"}."""
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / count,
            "loss": float(totals["loss"]) / count,
            "num_examples": int(round(float(totals["count"])))}


class NextTokenTask(Task):
  """Decoder language modelling: batch {"tokens" (B, T + 1)[, "weight" (B, T + 1)]}.

  The model reads tokens[:, :-1] and predicts tokens[:, 1:]; a target counts with the weight
  of its own position (0 for padding). Loss and accuracy are token-weighted; the perplexity
  is exp of the mean negative log-likelihood over every counted next token.
  """
  name = "next_token"
  input_key = "tokens"
  input_dtype = jnp.int32

  def inputs(self, batch):
    return batch["tokens"][:, :-1]

  def per_example(self, logits, batch):
    targets = batch["tokens"][:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    weight = batch["weight"][:, 1:] if "weight" in batch else jnp.ones_like(losses)
    return losses, correct, weight

  def rates(self, totals):
    """{"perplexity", "loss", "accuracy", "num_tokens"}."""
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    loss = float(totals["loss"]) / count
    return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss,
            "accuracy": float(totals["correct"]) / count,
            "num_tokens": int(round(float(totals["count"])))}


TASKS = {t.name: t for t in (ClassificationTask(), NextTokenTask())}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
  return TASKS[name]


def make_eval_loss(model: nn.Module, task: Task, *, reduce: str = "mean") -> Callable:
  """loss_fn(params, batch_stats, batch): the eval-mode loss of `model` on `batch`.

  reduce="mean": weighted mean (the Hessian probes); "sum": weighted sum, so that each
  example's input gradient does not shrink with the batch size (the attacks).
  """
  if reduce not in ("mean", "sum"):
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")

  def loss_fn(params, batch_stats, batch):
    logits = model.apply(model_variables(params, batch_stats), task.inputs(batch), train=False)
    losses, _, weight = task.per_example(logits, batch)
    return weighted_mean(losses, weight) if reduce == "mean" else jnp.sum(losses * weight)

  return loss_fn
