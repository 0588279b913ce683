"""Hessian estimators: known spectra, hvp against the materialised Hessian, sharded == unsharded."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from safe_dist import sharpness

EIGS = np.array([10.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5], np.float32)


def _quadratic(eigs, seed=0):
  """params (two leaves), loss 0.5 x^T A x with A = Q diag(eigs) Q^T, and A."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
  a = jnp.asarray((q * eigs) @ q.T, jnp.float32)
  params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
  _, unravel = ravel_pytree(params)

  def loss_fn(p, batch):
    del batch
    x = ravel_pytree(p)[0]
    return 0.5 * x @ a @ x

  return params, loss_fn, a, unravel


def test_max_eigenvalue_quadratic():
  params, loss_fn, _, _ = _quadratic(EIGS)
  hvp = sharpness.make_hvp(loss_fn)
  est = jax.jit(lambda p, k: sharpness.max_eigenvalue(hvp, p, None, k, num_iters=40))
  np.testing.assert_allclose(est(params, jax.random.key(1)), EIGS.max(), rtol=1e-4)


def test_max_eigenvalue_largest_magnitude_is_signed():
  eigs = np.array([-8.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1], np.float32)
  params, loss_fn, _, _ = _quadratic(eigs, seed=3)
  hvp = sharpness.make_hvp(loss_fn)
  est = jax.jit(lambda p, k: sharpness.max_eigenvalue(hvp, p, None, k, num_iters=40))(
      params, jax.random.key(0))
  np.testing.assert_allclose(est, -8.0, rtol=1e-4)


def test_hessian_trace_quadratic():
  params, loss_fn, a, unravel = _quadratic(EIGS)
  hvp = sharpness.make_hvp(loss_fn)
  est = jax.jit(lambda p, k: sharpness.hessian_trace(hvp, p, None, k, num_samples=200))
  np.testing.assert_allclose(est(params, jax.random.key(2)), EIGS.sum(), rtol=0.05)
  # The estimator is unbiased: averaged over every sign vector it is exactly tr(A).
  signs = jnp.asarray(list(itertools.product([-1.0, 1.0], repeat=len(EIGS))), jnp.float32)
  quad = jax.jit(jax.vmap(lambda s: sharpness.tree_vdot(unravel(s), hvp(params, None, unravel(s)))))
  exact = np.mean(quad(signs))
  np.testing.assert_allclose(exact, np.trace(a), rtol=1e-5)
  np.testing.assert_allclose(exact, EIGS.sum(), rtol=1e-5)


def test_invalid_counts():
  params, loss_fn, _, _ = _quadratic(EIGS)
  hvp = sharpness.make_hvp(loss_fn)
  with pytest.raises(ValueError, match="num_iters"):
    sharpness.max_eigenvalue(hvp, params, None, jax.random.key(0), num_iters=0)
  with pytest.raises(ValueError, match="num_samples"):
    sharpness.hessian_trace(hvp, params, None, jax.random.key(0), num_samples=0)


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = jnp.tanh(x)
    return nn.Dense(3)(x)


def _mlp_setup():
  model = _MLP()
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, size=16), jnp.int32)}
  variables = model.init(jax.random.key(0), batch["image"])
  stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])  # not the identity
  return model, variables["params"], stats, batch


def test_hvp_matches_materialised_hessian():
  model, params, stats, batch = _mlp_setup()
  loss_fn = sharpness.make_model_loss(model)
  flat, unravel = ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), stats, batch)))(flat)
  hvp = sharpness.make_hvp(lambda p, aux: loss_fn(p, *aux))
  v = unravel(jax.random.normal(jax.random.key(3), flat.shape))
  got = ravel_pytree(jax.jit(hvp)(params, (stats, batch), v))[0]
  np.testing.assert_allclose(got, hessian @ ravel_pytree(v)[0], rtol=1e-4, atol=1e-6)
  # Power iteration and Hutchinson against the exact spectrum and trace.
  eig = jax.jit(lambda p, aux, k: sharpness.max_eigenvalue(hvp, p, aux, k, num_iters=300))(
      params, (stats, batch), jax.random.key(4))
  top = np.abs(np.linalg.eigvalsh(np.asarray(hessian, np.float64))).max()
  np.testing.assert_allclose(abs(eig), top, rtol=2e-2)


def test_model_without_batch_stats():
  model = nn.Dense(3)
  x = jnp.ones((4, 5))
  params = model.init(jax.random.key(0), x)["params"]
  apply = model.apply
  model_fn = type("M", (), {"apply": staticmethod(
      lambda variables, x, train: apply(variables, x))})()
  out = jax.jit(sharpness.make_sharpness_fn(model_fn, num_iters=5, num_samples=5))(
      params, {}, {"image": x, "label": jnp.zeros((4,), jnp.int32)}, jax.random.key(0))
  assert set(out) == {"sharpness/hessian_max_eig", "sharpness/hessian_trace"}
  assert all(np.isfinite(v) for v in out.values())


def _spec(x):
  """Shard the first dimension that divides over 8 devices, else replicate."""
  for i, d in enumerate(x.shape):
    if d % 8 == 0:
      return P(*([None] * i + ["data"]))
  return P()


def test_sharded_equals_unsharded():
  assert jax.device_count() == 8
  model, params, stats, batch = _mlp_setup()
  fn = sharpness.make_sharpness_fn(model, num_iters=10, num_samples=6)
  key = jax.random.key(5)
  expected = jax.jit(fn)(params, stats, batch, key)

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda tree: jax.tree.map(lambda x: NamedSharding(mesh, _spec(x)), tree)
  in_shardings = (shard(params), shard(stats), shard(batch), NamedSharding(mesh, P()))
  args = jax.device_put((params, stats, batch, key), in_shardings)
  assert not args[0]["Dense_0"]["kernel"].sharding.is_fully_replicated
  got = jax.jit(fn, in_shardings=in_shardings)(*args)
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, err_msg=k)
