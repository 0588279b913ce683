"""The task seam: losses, sums and rates against float64 numpy on random inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_dist import tasks


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_next_token_perplexity_is_token_weighted():
  rng = np.random.default_rng(0)
  batch, length, vocab = 3, 7, 11
  tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
  weight = (rng.uniform(size=(batch, length + 1)) > 0.3).astype(np.float32)
  logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
  task = tasks.get_task("next_token")
  np.testing.assert_array_equal(task.inputs({"tokens": tokens}), tokens[:, :-1])
  sums = task.eval_sums(jnp.asarray(logits), {"tokens": tokens, "weight": weight})
  rates = task.rates(sums)

  nll = -np.take_along_axis(_log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
  w = weight[:, 1:]  # a target counts with its own position's weight
  mean_nll = (nll * w).sum() / w.sum()
  assert rates["num_tokens"] == int(w.sum())
  assert rates["loss"] == pytest.approx(mean_nll, rel=1e-5)
  assert rates["perplexity"] == pytest.approx(np.exp(mean_nll), rel=1e-5)
  correct = (logits.argmax(-1) == tokens[:, 1:]) * w
  assert rates["accuracy"] == pytest.approx(correct.sum() / w.sum())
  loss, metrics = task.loss_and_metrics(jnp.asarray(logits), {"tokens": tokens, "weight": weight})
  assert float(loss) == pytest.approx(mean_nll, rel=1e-5)
  assert float(metrics["train/accuracy"]) == pytest.approx(rates["accuracy"])


def test_classification_sums_weight_out_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 8).astype(np.int32)
  weight = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  task = tasks.get_task("classification")
  rates = task.rates(task.eval_sums(jnp.asarray(logits),
                                    {"image": None, "label": labels, "weight": weight}))
  nll = -_log_softmax(logits)[np.arange(8), labels]
  assert rates["num_examples"] == 5
  assert rates["loss"] == pytest.approx(nll[:5].mean(), rel=1e-5)
  assert rates["accuracy"] == pytest.approx(np.mean(logits[:5].argmax(-1) == labels[:5]))


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name="dense")(x)


def test_eval_loss_mean_and_sum():
  rng = np.random.default_rng(2)
  model = _Linear()
  images = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 3, 6).astype(np.int32)
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  batch = {"image": images, "label": labels}
  task = tasks.get_task("classification")
  mean = tasks.make_eval_loss(model, task)(params, {}, batch)
  total = tasks.make_eval_loss(model, task, reduce="sum")(params, {}, batch)
  dense = params["dense"]
  logits = images @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"])
  nll = -_log_softmax(logits)[np.arange(6), labels]
  assert float(mean) == pytest.approx(nll.mean(), rel=1e-5)
  assert float(total) == pytest.approx(nll.sum(), rel=1e-5)


def test_unknown_task_names_the_choices():
  with pytest.raises(ValueError, match="classification"):
    tasks.get_task("regression")
