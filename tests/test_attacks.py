"""PGD: the analytic worst case of a linear classifier, the constraints, sharding, arguments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from safe_dist import attacks
from safe_dist import tasks

SHAPE = (2, 2, 3)
DIM = int(np.prod(SHAPE))


class _Linear(nn.Module):
  classes: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.classes)(x.reshape((x.shape[0], -1)))


def _sum_loss(model):
  return tasks.make_eval_loss(model, tasks.get_task("classification"), reduce="sum")


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _linear_problem(n=16, seed=0):
  rng = np.random.default_rng(seed)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(DIM, 2)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
  batch = {"image": jnp.asarray(rng.uniform(0.3, 0.7, size=(n,) + SHAPE), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 2, size=n), jnp.int32)}
  return _Linear(), params, batch


def _analytic_worst(params, batch, norm, bound):
  """The linear logit difference is maximised at x + bound * sign(w_d) or bound * w_d/|w_d|."""
  w = np.asarray(params["Dense_0"]["kernel"])
  labels = np.asarray(batch["label"])
  w_diff = (w[:, 1 - labels] - w[:, labels]).T  # other class minus true class, (n, DIM)
  if norm == "linf":
    step = bound * np.sign(w_diff)
  else:
    step = bound * w_diff / np.linalg.norm(w_diff, axis=1, keepdims=True)
  return batch["image"] + step.reshape((-1,) + SHAPE)


@pytest.mark.parametrize("norm,bound,lr,steps", [("linf", 0.1, 0.03, 10), ("l2", 0.2, 0.1, 30)])
def test_reaches_analytic_optimum(norm, bound, lr, steps):
  model, params, batch = _linear_problem()
  attack = jax.jit(attacks.make_pgd_attack(_sum_loss(model), norm, steps, bound, lr))
  adv = attack(params, {}, batch, jax.random.key(0))
  loss = lambda x: _ce(model.apply({"params": params}, x), batch["label"])
  best = loss(_analytic_worst(params, batch, norm, bound))
  assert np.all(loss(adv) > loss(batch["image"]))
  np.testing.assert_allclose(loss(adv), best, rtol=1e-3)


@pytest.mark.parametrize("norm,bound", [("linf", 0.25), ("l2", 1.5)])
def test_stays_in_ball_and_pixel_range(norm, bound):
  model, params, batch = _linear_problem()
  rng = np.random.default_rng(1)  # clean pixels near the box edges, so clipping is active
  batch["image"] = jnp.asarray(rng.choice([0.0, 0.05, 0.95, 1.0], size=batch["image"].shape),
                               jnp.float32)
  adv = jax.jit(attacks.make_pgd_attack(_sum_loss(model), norm, 5, bound, bound))(
      params, {}, batch, jax.random.key(1))
  assert adv.shape == batch["image"].shape and adv.dtype == jnp.float32
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  delta = np.asarray(adv - batch["image"]).reshape(len(adv), -1)
  size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
  assert np.all(size <= bound * (1 + 1e-5))
  assert np.any(size > 0.5 * bound)


def test_accuracy_under_attack_not_above_clean():
  rng = np.random.default_rng(2)
  images = rng.uniform(0, 1, size=(256,) + SHAPE).astype(np.float32)
  labels = (images[:, :, 0].mean((1, 2)) > images[:, :, 1].mean((1, 2))).astype(np.int32)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  model = _Linear()
  params = model.init(jax.random.key(0), batch["image"])["params"]
  tx = optax.adam(0.05)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt = carry
      grads = jax.grad(lambda p: _ce(model.apply({"params": p}, batch["image"]),
                                     batch["label"]).mean())(params)
      updates, opt = tx.update(grads, opt)
      return (optax.apply_updates(params, updates), opt), None
    return jax.lax.scan(step, (params, tx.init(params)), None, length=300)[0][0]

  params = train(params)
  accuracy = lambda x: float(np.mean(np.argmax(model.apply({"params": params}, x), -1) == labels))
  clean = accuracy(batch["image"])
  assert clean > 0.9
  for norm, bound in [("linf", 0.02), ("linf", 0.2), ("l2", 0.5)]:
    adv = jax.jit(attacks.make_pgd_attack(_sum_loss(model), norm, 10, bound, bound / 4))(
        params, {}, batch, jax.random.key(3))
    assert accuracy(adv) <= clean
  assert accuracy(adv) < clean - 0.3  # a large l2 ball flips many predictions


def test_sharded_batch_equals_unsharded():
  model, params, batch = _linear_problem(n=16)
  attack = attacks.make_pgd_attack(_sum_loss(model), "l2", 5, 0.3, 0.1)
  key = jax.random.key(4)
  expected = jax.jit(attack)(params, {}, batch, key)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = jax.tree.map(lambda _: NamedSharding(mesh, P("data")), batch)
  in_shardings = (jax.tree.map(lambda _: replicated, params), {}, batch_sharding, replicated)
  args = jax.device_put((params, {}, batch, key), in_shardings)
  got = jax.jit(attack, in_shardings=in_shardings, out_shardings=batch_sharding["image"])(*args)
  assert not got.sharding.is_fully_replicated
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,flag", [
    ({"norm": "l1"}, "--attack_norm"),
    ({"steps": 0}, "--attack_steps"),
    ({"steps": 2.5}, "--attack_steps"),
    ({"bound": 0.0}, "--attack_bound"),
    ({"bound": -1.0}, "--attack_bound"),
    ({"lr": 0.0}, "--attack_lr"),
])
def test_invalid_arguments(kwargs, flag):
  args = {"norm": "linf", "steps": 3, "bound": 0.1, "lr": 0.01, **kwargs}
  with pytest.raises(ValueError, match=flag):
    attacks.make_pgd_attack(_sum_loss(_Linear()), **args)
