"""Hessian estimators: known spectra, closed-form Hessians, sharded == unsharded, and the
budgeted, interruptible `HessianProbe` (on a fake clock: no test asserts on wall time)."""

import itertools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
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

  def loss_fn(p, batch_stats, batch):
    del batch_stats, batch
    x = ravel_pytree(p)[0]
    return 0.5 * x @ a @ x

  return params, loss_fn, a, unravel


def test_max_eigenvalue_quadratic():
  params, loss_fn, _, _ = _quadratic(EIGS)
  est = jax.jit(lambda p, k: sharpness.max_eigenvalue(loss_fn, p, None, None, k, num_iters=40))
  np.testing.assert_allclose(est(params, jax.random.key(1)), EIGS.max(), rtol=1e-4)


def test_max_eigenvalue_largest_magnitude_is_signed():
  eigs = np.array([-8.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1], np.float32)
  params, loss_fn, _, _ = _quadratic(eigs, seed=3)
  est = jax.jit(lambda p, k: sharpness.max_eigenvalue(loss_fn, p, None, None, k, num_iters=40))
  np.testing.assert_allclose(est(params, jax.random.key(0)), -8.0, rtol=1e-4)


def test_hessian_trace_quadratic():
  params, loss_fn, a, unravel = _quadratic(EIGS)
  est = jax.jit(lambda p, k: sharpness.hessian_trace(loss_fn, p, None, None, k,
                                                     num_samples=200))
  np.testing.assert_allclose(est(params, jax.random.key(2)), EIGS.sum(), rtol=0.05)
  # The estimator is unbiased: averaged over every sign vector it is exactly tr(A).
  hvp = sharpness.make_hvp(loss_fn)
  signs = jnp.asarray(list(itertools.product([-1.0, 1.0], repeat=len(EIGS))), jnp.float32)
  quad = jax.jit(jax.vmap(lambda s: sharpness.tree_vdot(
      unravel(s), hvp(params, None, None, unravel(s)))))
  exact = np.mean(quad(signs))
  np.testing.assert_allclose(exact, np.trace(a), rtol=1e-5)
  np.testing.assert_allclose(exact, EIGS.sum(), rtol=1e-5)


def test_invalid_counts():
  params, loss_fn, _, _ = _quadratic(EIGS)
  with pytest.raises(ValueError, match="num_iters"):
    sharpness.max_eigenvalue(loss_fn, params, None, None, jax.random.key(0), num_iters=0)
  with pytest.raises(ValueError, match="num_samples"):
    sharpness.hessian_trace(loss_fn, params, None, None, jax.random.key(0), num_samples=0)
  with pytest.raises(ValueError, match="counts"):
    sharpness.HessianProbe(loss_fn, num_iters=-1, num_samples=1)


def _cross_entropy_loss(apply):
  """Mean cross-entropy of logits `apply(variables, images)`; `batch_stats` may be `{}`."""

  def loss_fn(params, batch_stats, batch):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = apply(variables, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return loss_fn


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
  loss_fn = _cross_entropy_loss(lambda v, x: model.apply(v, x, train=False))
  return loss_fn, variables["params"], stats, batch


def test_hvp_matches_materialised_hessian():
  loss_fn, params, stats, batch = _mlp_setup()
  flat, unravel = ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), stats, batch)))(flat)
  hvp = sharpness.make_hvp(loss_fn)
  v = unravel(jax.random.normal(jax.random.key(3), flat.shape))
  got = ravel_pytree(jax.jit(hvp)(params, stats, batch, v))[0]
  np.testing.assert_allclose(got, hessian @ ravel_pytree(v)[0], rtol=1e-4, atol=1e-6)
  # Power iteration against the exact spectrum.
  eig = jax.jit(lambda p, s, b, k: sharpness.max_eigenvalue(loss_fn, p, s, b, k, num_iters=300))(
      params, stats, batch, jax.random.key(4))
  top = np.abs(np.linalg.eigvalsh(np.asarray(hessian, np.float64))).max()
  np.testing.assert_allclose(abs(eig), top, rtol=2e-2)


def test_dense_cross_entropy_matches_numpy_hessian():
  """A linear softmax classifier's Hessian, written out in float64 without autodiff."""
  n, d, k = 32, 5, 3
  rng = np.random.default_rng(0)
  x, labels = rng.normal(size=(n, d)), rng.integers(0, k, size=n)
  params = {"kernel": 0.5 * rng.normal(size=(d, k)), "bias": 0.1 * rng.normal(size=k)}
  logits = x @ params["kernel"] + params["bias"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  # d2 loss / d w[a, c] d w[b, e] = mean_i f_ia f_ib (p_ic [c == e] - p_ic p_ie), f = (x, 1).
  f = np.concatenate([x, np.ones((n, 1))], 1)
  softmax_hessian = np.einsum("ic,ce->ice", p, np.eye(k)) - np.einsum("ic,ie->ice", p, p)
  hessian = np.einsum("ia,ib,ice->acbe", f, f, softmax_hessian).reshape(
      (d + 1) * k, (d + 1) * k) / n
  # ravel_pytree orders bias (row d of w) before kernel (rows 0..d-1).
  order = np.concatenate([np.arange(d * k, (d + 1) * k), np.arange(d * k)])
  hessian = hessian[np.ix_(order, order)]

  loss_fn = _cross_entropy_loss(nn.Dense(k).apply)
  params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  batch = {"image": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels, jnp.int32)}
  flat, unravel = ravel_pytree(params32)
  v = rng.normal(size=flat.shape)
  hv = jax.jit(sharpness.make_hvp(loss_fn))(params32, {}, batch, unravel(jnp.asarray(v)))
  np.testing.assert_allclose(ravel_pytree(hv)[0], hessian @ v, rtol=1e-4, atol=1e-6)
  # The top two eigenvalues differ by a factor 0.82, so the Rayleigh quotient's error after
  # 100 iterations is ~0.82^200 relative: float32 rounding dominates.
  eig = jax.jit(lambda p, b, key: sharpness.max_eigenvalue(loss_fn, p, {}, b, key, 100))(
      params32, batch, jax.random.key(0))
  np.testing.assert_allclose(eig, np.linalg.eigvalsh(hessian).max(), rtol=1e-4)


def test_least_squares_dense_is_exact():
  """0.5 mean |x W + b - y|^2 with orthogonal, zero-mean features has a diagonal Hessian.

  It is diag(|x_a|^2 / n) for kernel row a, 1 for the bias, per output; for a diagonal H,
  v^T H v = tr(H) for every sign vector v, so even one Hutchinson sample is exact, and the top
  eigenvalue (9, next 3) is exact after a few power steps.
  """
  n, d, k = 8, 3, 2
  # Orthonormal columns, the first along the ones vector: the others have zero mean.
  q, _ = np.linalg.qr(np.concatenate(
      [np.ones((n, 1)), np.random.default_rng(0).normal(size=(n, d))], 1))
  x = q[:, 1:] * np.sqrt(n) * np.array([3.0, np.sqrt(3.0), 0.5])  # |x_a|^2 / n = 9, 3, 0.25
  diag = np.concatenate([[9.0, 3.0, 0.25], [1.0]])
  model = nn.Dense(k)
  y = jnp.asarray(np.random.default_rng(1).normal(size=(n, k)), jnp.float32)

  def loss_fn(params, batch_stats, batch):
    del batch_stats
    return 0.5 * jnp.mean(jnp.sum((model.apply({"params": params}, batch["x"]) - y) ** 2, -1))

  batch = {"x": jnp.asarray(x, jnp.float32)}
  params = model.init(jax.random.key(0), batch["x"])["params"]
  out = jax.jit(sharpness.make_sharpness_fn(loss_fn, num_iters=30, num_samples=1))(
      params, {}, batch, jax.random.key(0))
  np.testing.assert_allclose(out[sharpness.MAX_EIG], 9.0, rtol=1e-5)
  np.testing.assert_allclose(out[sharpness.TRACE], k * diag.sum(), rtol=1e-5)


def _spec(x):
  """Shard the first dimension that divides over 8 devices, else replicate."""
  for i, d in enumerate(x.shape):
    if d % 8 == 0:
      return P(*([None] * i + ["data"]))
  return P()


def _assert_values_close(got: dict, expected: dict, rtol=1e-5):
  assert set(got) == set(expected)
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=rtol, err_msg=k)


def test_sharded_equals_unsharded():
  assert jax.device_count() == 8
  loss_fn, params, stats, batch = _mlp_setup()
  fn = sharpness.make_sharpness_fn(loss_fn, num_iters=10, num_samples=6)
  key = jax.random.key(5)
  expected = jax.jit(fn)(params, stats, batch, key)

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda tree: jax.tree.map(lambda x: NamedSharding(mesh, _spec(x)), tree)
  in_shardings = (shard(params), shard(stats), shard(batch))
  args = jax.device_put((params, stats, batch), in_shardings)
  assert not args[0]["Dense_0"]["kernel"].sharding.is_fully_replicated
  got = jax.jit(fn, in_shardings=(*in_shardings, NamedSharding(mesh, P())))(*args, key)
  _assert_values_close(got, expected, rtol=1e-4)
  # The stepped probe, run with the same shardings, gives the same numbers.
  probe = sharpness.HessianProbe(loss_fn, num_iters=10, num_samples=6, in_shardings=in_shardings)
  _assert_values_close(probe.measure(*args, key).values, expected, rtol=1e-4)


# HessianProbe: a fake clock on which every Hessian-vector product takes a set time.


class _Clock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _probe(monkeypatch, seconds_per_hvp=0.0, num_iters=6, num_samples=3):
  """A probe of the MLP loss whose products each take `seconds_per_hvp` on its clock."""
  loss_fn, params, stats, batch = _mlp_setup()
  clock = _Clock()
  probe = sharpness.HessianProbe(loss_fn, num_iters=num_iters, num_samples=num_samples,
                                 clock=clock)
  probe.calls = 0
  run = probe._run

  def slow_run(*args):
    next_v, quad, _ = run(*args)
    clock.now += seconds_per_hvp
    probe.calls += 1
    return next_v, quad, seconds_per_hvp

  monkeypatch.setattr(probe, "_run", slow_run)
  return probe, (loss_fn, params, stats, batch)


def _fused(loss_fn, params, stats, batch, key, num_iters, num_samples):
  fn = sharpness.make_sharpness_fn(loss_fn, num_iters=num_iters, num_samples=num_samples)
  return jax.jit(fn)(params, stats, batch, key)


def test_fit_counts():
  assert sharpness.fit_counts(20, 10, 30) == (20, 10)
  assert sharpness.fit_counts(20, 10, 15) == (10, 5)
  assert sharpness.fit_counts(20, 10, 3) == (2, 1)
  assert sharpness.fit_counts(20, 10, 4) == (2, 1)
  assert sharpness.fit_counts(20, 10, 2) is None
  assert sharpness.fit_counts(0, 10, 4) == (0, 4)
  assert sharpness.fit_counts(20, 0, 1) is None


@pytest.mark.parametrize("budget", [None, 1e6])
def test_probe_equals_fused_at_full_budget(monkeypatch, budget):
  probe, (loss_fn, params, stats, batch) = _probe(monkeypatch, seconds_per_hvp=1.0)
  key = jax.random.key(7)
  m = probe.measure(params, stats, batch, key, budget_seconds=budget)
  assert (m.status, m.hvps, m.note, probe.calls) == ("complete", 9, "", 9)
  _assert_values_close(m.values, _fused(loss_fn, params, stats, batch, key, 6, 3))
  # x then Proj(x): the same shapes and shardings reuse the compiled product.
  probe.measure(jax.tree.map(lambda a: 0.5 * a, params), stats, batch, key)
  assert len(probe._compiled) == 1


def test_probe_minimum_budget_runs_the_minimum(monkeypatch):
  probe, (loss_fn, params, stats, batch) = _probe(monkeypatch, seconds_per_hvp=1.0)
  key = jax.random.key(8)
  m = probe.measure(params, stats, batch, key, budget_seconds=3.5)
  assert (m.status, m.hvps, probe.calls) == ("reduced", 3, 3)
  assert "cut from 6 + 3 to 2 + 1" in m.note
  _assert_values_close(m.values, _fused(loss_fn, params, stats, batch, key, 2, 1))


def test_probe_skips_when_one_product_is_too_slow(monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  probe, (_, params, stats, batch) = _probe(monkeypatch, seconds_per_hvp=100.0)
  m = probe.measure(params, stats, batch, jax.random.key(0), budget_seconds=6.0, label="x")
  assert (m.status, m.hvps, m.values, probe.calls) == ("skipped", 1, {}, 1)
  assert m.note == "one Hessian-vector product takes 100.0 s, budget 6.0 s"
  assert f"sharpness x: skipped ({m.note})" in caplog.messages
  # A caller's estimate skips before compiling or running anything.
  m = probe.measure(params, stats, batch, jax.random.key(0), budget_seconds=6.0,
                    hvp_seconds_estimate=41.2)
  assert (m.status, m.hvps, probe.calls, len(probe._compiled)) == ("skipped", 0, 1, 1)
  assert "sharpness: skipped (one Hessian-vector product takes ~41.2 s (estimated), " \
      "budget 6.0 s)" in caplog.messages


def test_probe_stops_between_products(monkeypatch):
  probe, (_, params, stats, batch) = _probe(monkeypatch, seconds_per_hvp=1.0)
  m = probe.measure(params, stats, batch, jax.random.key(0), should_stop=lambda: probe.calls >= 2)
  assert (m.status, m.hvps, m.values, probe.calls) == ("interrupted", 2, {}, 2)
  assert "interrupted" in m.note
  m = probe.measure(params, stats, batch, jax.random.key(0), should_stop=lambda: True)
  assert (m.status, m.hvps) == ("interrupted", 0)


def test_probe_logs_slow_measurements_only(monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  probe, (_, params, stats, batch) = _probe(monkeypatch, seconds_per_hvp=3.0, num_iters=20,
                                            num_samples=10)
  m = probe.measure(params, stats, batch, jax.random.key(0), budget_seconds=1000.0, label="x")
  assert m.status == "complete" and m.seconds >= 90.0
  lines = [s for s in caplog.messages if s.startswith("sharpness x:")]
  assert lines[0].startswith("sharpness x: measuring 20 power iterations + 10 Hutchinson "
                             "samples, 3.0 s per Hessian-vector product, ~90 s expected "
                             "(budget 1000.0 s;")
  progress = [s for s in lines if "/30 Hessian-vector products" in s]
  assert len(progress) == 7  # 10 s or more apart: every 4 products (12 s) after the first
  assert progress[0] == "sharpness x: 5/30 Hessian-vector products, 15 s"
  assert lines[-1] == "sharpness x: done in 90.0 s (30 Hessian-vector products)"
  caplog.clear()
  fast, (_, params, stats, batch) = _probe(monkeypatch, seconds_per_hvp=0.1)
  fast.measure(params, stats, batch, jax.random.key(0), label="x")
  assert not [s for s in caplog.messages if s.startswith("sharpness")]
