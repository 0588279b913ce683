"""Every sparsifier and prune_mask under jax_enable_x64: float64 params stay float64 throughout.

The x64 mode is switched on per test with the `jax.enable_x64` context (jit caches key on it).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from algorithm1_reference import check_against_reference
from numpy_reference import keep_mask_global, keep_mask_nm
from safe_dist import trainer
from safe_dist.sparsity import SparsifierConfig, make_optimizer, prune_mask, sparsifier_metrics
from trainer_helpers import debug_experiment, read_scalars, replace

SPARSIFIERS = [("safe", "activation"), ("safe_plus", "activation"), ("safe_plus", "grad_sq"),
               ("admm", "activation"), ("gmp", "activation"), ("iht", "activation"),
               ("magnitude", "activation"), ("none", "activation")]


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("name,rho,schedule", [("safe", 0.05, "cosine"), ("admm", 0.0, "linear"),
                                               ("safe", 0.1, "constant"), ("iht", 0.0, "cosine")])
def test_update_rule_matches_float64_reference_tightly(name, rho, schedule):
  check_against_reference(name, rho, schedule, seed=0, dtype=jnp.float64, tol=1e-12)


def _run(name, importance, dtype, steps=3):
  """`steps` jitted updates of a small conv + dense model; the final (params, state, metrics)."""
  rng = np.random.default_rng(0)
  shapes = {"conv": {"kernel": (3, 3, 4, 8), "bias": (8,)}, "dense": {"kernel": (16, 8)}}
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  cfg = SparsifierConfig(name=name, importance=importance, sparsity=0.6, dual_update_interval=2,
                         prune_interval=1, prune_fraction=0.3, lam=0.1)
  tx = make_optimizer(cfg, optax.sgd(0.01, momentum=0.9), steps)
  loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))
  value_and_grad = jax.value_and_grad(loss)
  norms = {"conv": {"kernel": jnp.ones((1, 1, 4, 1), dtype), "bias": jnp.zeros([], dtype)},
           "dense": {"kernel": jnp.ones((16, 1), dtype)}}

  @jax.jit
  def step(params, state):
    _, grads = value_and_grad(params)
    updates, state = tx.update(grads, state, params, value_and_grad_fn=value_and_grad,
                               input_sq_norms=norms)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state, jax.jit(sparsifier_metrics)(params, state)


def _all_of_dtype(params, state, metrics, dtype) -> None:
  assert all(x.dtype == dtype for x in jax.tree.leaves(params))
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(x.dtype == dtype for x in floats), {x.dtype for x in floats}
  assert all(m.dtype == dtype for m in metrics.values())


@pytest.mark.parametrize("name,importance", SPARSIFIERS)
def test_every_sparsifier_keeps_float64(name, importance):
  params, state, metrics = _run(name, importance, jnp.float64)
  _all_of_dtype(params, state, metrics, jnp.float64)
  if name != "none":
    assert float(metrics["sparsity/z"]) > 0.5


@pytest.mark.parametrize("name,importance", [("safe", "activation"), ("safe_plus", "grad_sq"),
                                             ("iht", "activation")])
def test_float32_params_stay_float32_under_x64(name, importance):
  _all_of_dtype(*_run(name, importance, jnp.float32), jnp.float32)


def _scores(rng):
  """float64 scores, distinct at float32 precision (prune_mask ranks at float32 precision),
  with some exact ties."""
  arrays = [rng.random((16, 12)), rng.random((8, 4, 6)), rng.random((40,))]
  arrays[0][3, :5] = arrays[0][0, 0]
  return arrays


@pytest.mark.parametrize("sharded", [False, True])
def test_prune_mask_on_float64_scores(sharded):
  rng = np.random.default_rng(1)
  arrays = _scores(rng)
  n = sum(a.size for a in arrays)
  shardings = None
  xs = [jnp.asarray(a) for a in arrays]
  if sharded:
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = [NamedSharding(mesh, s) for s in (P("a", "b"), P(None, "a", "b"), P(("a", "b")))]
    xs = [jax.device_put(x, s) for x, s in zip(xs, shardings)]
  assert all(x.dtype == jnp.float64 for x in xs)
  glob = jax.jit(lambda x, s: prune_mask(x, s, shardings=shardings))
  layer = jax.jit(lambda x, s: prune_mask(x, s, scope="layerwise", shardings=shardings))
  for s in (0.0, 0.3, 0.5, 0.9):
    sparsity = jnp.float64(s)  # traced float64: floor(s * n) in float64
    for g, w in zip(glob(xs, sparsity), keep_mask_global(arrays, int(np.floor(s * n)))):
      np.testing.assert_array_equal(np.asarray(g), w)
    for g, a in zip(layer(xs, sparsity), arrays):
      want = keep_mask_global([a], int(np.floor(s * a.size)))[0]
      np.testing.assert_array_equal(np.asarray(g), want)
  nm = prune_mask(xs[:2], 0.5, n_m=(2, 4), shardings=shardings and shardings[:2])
  for g, a in zip(nm, arrays[:2]):
    np.testing.assert_array_equal(np.asarray(g), keep_mask_nm(a, 2, 4))


def test_a_whole_run_in_float64(tmp_path):
  """Train (SAFE+: SAM, ADMM, importance), evaluation, projection, Hessian probes, final
  network and checkpoint, all with x64 on."""
  exp = replace(debug_experiment(**{"train.max_steps": 8}), "sparsifier", name="safe_plus")
  summary = trainer.train_and_evaluate(exp, str(tmp_path))
  assert summary["steps"] == 8
  assert summary["weight_sparsity"] == pytest.approx(0.95, abs=1e-4)
  scalars = read_scalars(os.path.join(str(tmp_path), "tensorboard"))
  for tag in ("train/loss", "sharpness/sam", "admm/constraint_gap", "admm/lambda",
              "val/accuracy", "val/masked_accuracy"):
    assert np.all(np.isfinite([v for _, v in scalars[tag]])), tag
