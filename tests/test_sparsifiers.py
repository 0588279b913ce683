"""SAFE, ADMM, GMP, IHT and one-shot magnitude against a float64 numpy reference of the update rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpy_reference import keep_mask_global
from safe_dist import optim
from safe_dist.sparsity import (Projection, SparsifierConfig, auxiliary_and_dual, admm,
                                find_admm_state, make_optimizer, prunable_tree)
from safe_dist.sparsity import schedules

KERNEL_SHAPES = {"conv/kernel": (3, 3, 2, 4), "dense/kernel": (12, 5)}  # in tree order


def _nest(flat):
  """{"a/b": x} -> {"a": {"b": x}} (flax-style parameter names)."""
  out = {}
  for path, value in flat.items():
    outer, inner = path.split("/")
    out.setdefault(outer, {})[inner] = value
  return out


def _problem(seed):
  """A separable quadratic f(w) = 1/2 sum c (w - t)^2 over two kernels and a bias."""
  rng = np.random.default_rng(seed)
  shapes = {**KERNEL_SHAPES, "dense/bias": (5,)}
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  curv = {k: rng.uniform(0.5, 2.0, size=s) for k, s in shapes.items()}
  target = {k: rng.normal(size=s) for k, s in shapes.items()}
  return params, curv, target


def _np_keep_mask(arrays, sparsity):
  """Global exact top-k on |a|: drop floor(s N), ties dropped from the highest position."""
  scores = [np.abs(a) for a in arrays]
  return keep_mask_global(scores, int(np.floor(sparsity * sum(a.size for a in scores))))


def _reference_run(cfg, params, curv, target, lr_fn, steps, total_steps, wd, momentum):
  """Algorithm 1 of SPEC.md in float64 numpy, with SGD + momentum + coupled weight decay."""
  x = {k: v.copy() for k, v in params.items()}
  kernels = list(KERNEL_SHAPES)
  grad = lambda w: {k: curv[k] * (w[k] - target[k]) for k in w}
  lam_fn = schedules.penalty_schedule(cfg.lam, cfg.lambda_schedule, total_steps)
  z = dict(zip(kernels, [x[k] * m for k, m in zip(kernels, _np_keep_mask([x[k] for k in kernels], cfg.sparsity))]))
  u = {k: np.zeros_like(x[k]) for k in kernels}
  trace = {k: np.zeros_like(v) for k, v in x.items()}
  for t in range(steps):
    if cfg.uses_admm and t % cfg.dual_update_interval == 0:
      a = {k: x[k] + u[k] for k in kernels}
      masks = _np_keep_mask([a[k] for k in kernels], cfg.sparsity)
      for k, m in zip(kernels, masks):
        z[k] = a[k] * m
        u[k] = a[k] - z[k]
    g = grad(x)
    if cfg.uses_sam:
      norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
      g = grad({k: x[k] + cfg.rho * g[k] / norm for k in x})
    if cfg.uses_admm:
      lam = float(lam_fn(t))
      for k in kernels:
        g[k] = g[k] + lam * (x[k] - z[k] + u[k])
    lr = float(lr_fn(t))
    for k in x:
      d = g[k] + wd * x[k]
      trace[k] = momentum * trace[k] + d
      x[k] = x[k] - lr * trace[k]
    if cfg.name == "iht":
      sp = float(schedules.sparsity_schedule(cfg.sparsity, cfg.sp_schedule,
                                             int(cfg.begin_fraction * total_steps),
                                             int(cfg.end_fraction * total_steps))(t))
      for k, m in zip(kernels, _np_keep_mask([x[k] for k in kernels], sp)):
        x[k] = x[k] * m
  return x, z, u


def _jax_run(cfg, params, curv, target, lr_fn, steps, total_steps, wd, momentum):
  curv, target = _nest(curv), _nest(target)
  loss_fn = lambda w: sum(jax.tree.leaves(jax.tree.map(
      lambda x, c, t: 0.5 * jnp.sum(c * (x - t) ** 2), w, curv, target)))
  value_and_grad = jax.value_and_grad(loss_fn)
  base = optim.make_base_optimizer(
      optim.OptimizerConfig(lr=0.1, weight_decay=wd, momentum=momentum), lr_fn)
  tx = make_optimizer(cfg, base, total_steps)
  x = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), _nest(params))
  state = tx.init(x)

  @jax.jit
  def step(x, state):
    _, g = value_and_grad(x)
    updates, state = tx.update(g, state, x, value_and_grad_fn=value_and_grad)
    return optax.apply_updates(x, updates), state

  for _ in range(steps):
    x, state = step(x, state)
  return x, state


@pytest.mark.parametrize("name,rho,schedule", [("safe", 0.05, "cosine"), ("admm", 0.0, "linear"),
                                               ("safe", 0.1, "constant"), ("iht", 0.0, "cosine")])
@pytest.mark.parametrize("seed", [0, 1])
def test_update_rule_matches_float64_reference(name, rho, schedule, seed):
  params, curv, target = _problem(seed)
  steps, total, wd, momentum = 11, 20, 1e-3, 0.9
  cfg = SparsifierConfig(name=name, sparsity=0.7, lam=0.5, lambda_schedule=schedule,
                         dual_update_interval=3, rho=rho, sp_schedule="cubic", end_fraction=0.4)
  lr_fn = optax.cosine_decay_schedule(0.05, total)
  want_x, want_z, want_u = _reference_run(cfg, params, curv, target, lr_fn, steps, total, wd, momentum)
  got_x, state = _jax_run(cfg, params, curv, target, lr_fn, steps, total, wd, momentum)
  at = lambda tree, k: np.asarray(tree[k.split("/")[0]][k.split("/")[1]])
  for k in params:
    np.testing.assert_allclose(at(got_x, k), want_x[k], rtol=2e-5, atol=2e-5, err_msg=k)
  if cfg.uses_admm:
    z, u = auxiliary_and_dual(find_admm_state(state))
    for k in KERNEL_SHAPES:
      np.testing.assert_allclose(at(z, k), want_z[k], rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(at(u, k), want_u[k], rtol=2e-5, atol=2e-5)
    n_kernel = sum(np.prod(s) for s in KERNEL_SHAPES.values())
    assert sum(int(np.sum(at(z, k) == 0)) for k in KERNEL_SHAPES) == int(0.7 * n_kernel)


def test_penalty_and_sam_only_touch_what_they_should():
  """ADMM state exists only for kernels; SAM changes the gradient, rho = 0 does not."""
  params, _, _ = _problem(3)
  params = jax.tree.map(jnp.asarray, _nest(params))
  tx = make_optimizer(SparsifierConfig(name="safe"), optax.sgd(0.1), 10)
  state = tx.init(params)
  z, _ = auxiliary_and_dual(find_admm_state(state))
  assert isinstance(z["dense"]["bias"], optax.MaskedNode)
  assert z["dense"]["kernel"].shape == (12, 5)
  assert jax.tree.leaves(prunable_tree(params)) == [True, False, True]


def test_gmp_mask_only_shrinks_and_reaches_target():
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32)}}
  total = 50
  cfg = SparsifierConfig(name="gmp", sparsity=0.9, begin_fraction=0.1, end_fraction=0.6,
                         prune_interval=5)
  tx = make_optimizer(cfg, optax.sgd(0.05), total)
  state = tx.init(params)
  update = jax.jit(tx.update)
  prev = np.ones((40, 30), bool)
  for t in range(total):
    grads = {"dense": {"kernel": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32)}}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    mask = np.asarray(optax.tree.get(state, "mask")["dense"]["kernel"])
    assert not np.any(mask & ~prev), f"mask grew back at step {t}"
    assert np.all(np.asarray(params["dense"]["kernel"])[~mask] == 0)
    prev = mask
  assert np.sum(~prev) == int(0.9 * prev.size)


def test_one_shot_magnitude_is_dense_then_fixed():
  rng = np.random.default_rng(1)
  params = {"k": {"kernel": jnp.asarray(rng.normal(size=(20, 10)), jnp.float32)}}
  tx = make_optimizer(SparsifierConfig(name="magnitude", sparsity=0.5, prune_fraction=0.5),
                      optax.sgd(0.01), 10)
  state = tx.init(params)
  update = jax.jit(tx.update)
  masks = []
  for _ in range(10):
    grads = {"k": {"kernel": jnp.asarray(rng.normal(size=(20, 10)), jnp.float32)}}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks.append(np.asarray(optax.tree.get(state, "mask")["k"]["kernel"]))
  assert all(m.all() for m in masks[:5])
  assert all(np.array_equal(m, masks[5]) for m in masks[5:])
  assert np.sum(~masks[5]) == 100


@pytest.mark.parametrize("kwargs,flag", [({"name": "prune"}, "--sparsifier"),
                                         ({"sparsity": 1.0}, "--sp"),
                                         ({"scope": "row"}, "--sp_scope"),
                                         ({"lambda_schedule": "step"}, "--lambda_schedule"),
                                         ({"dual_update_interval": 0}, "--dual_update_interval"),
                                         ({"rho": -1.0}, "--rho")])
def test_invalid_config_names_the_flag(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    SparsifierConfig(**kwargs)


def _two_array_admm(projection, penalty_fn, interval):
  """The textbook form that stores z and u (2x the weights), for the lean-state test."""

  def init_fn(params):
    return (jnp.zeros([], jnp.int32), params, jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params):
    count, z, u = state

    def dual_update(_):
      a = jax.tree.map(jnp.add, params, u)
      new_z = jax.tree.map(lambda x, m: x * m.astype(x.dtype), a,
                           projection.masks(jax.tree.map(jnp.abs, a)))
      return new_z, jax.tree.map(jnp.subtract, a, new_z)

    z, u = jax.lax.cond(count % interval == 0, dual_update, lambda _: (z, u), None)
    lam = penalty_fn(count)
    updates = jax.tree.map(lambda g, x, z_, u_: g + (lam * (x - z_ + u_)).astype(g.dtype),
                           updates, params, z, u)
    return updates, (count + 1, z, u)

  return optax.GradientTransformation(init_fn, update_fn)


@pytest.mark.parametrize("seed", [0, 1])
def test_lean_state_is_bit_identical_and_small(seed):
  rng = np.random.default_rng(seed)
  shapes = {"a": (50, 100), "b": (3, 3, 16, 30)}  # last dims not multiples of 8
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  projection = Projection(0.8)
  penalty = schedules.penalty_schedule(0.3, "cosine", 40)
  lean, full = admm(projection, penalty, 3), _two_array_admm(projection, penalty, 3)
  base = optax.sgd(0.05, momentum=0.9)
  txs = [optax.chain(t, base) for t in (lean, full)]
  xs = [params, params]
  states = [t.init(params) for t in txs]
  steps = [jax.jit(lambda g, s, x, t=t: t.update(g, s, x)) for t in txs]
  for t in range(17):
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    z_before = states[1][0][1]
    for i in range(2):
      updates, states[i] = steps[i](grads, states[i], xs[i])
      xs[i] = optax.apply_updates(xs[i], updates)
    for k in shapes:
      np.testing.assert_array_equal(np.asarray(xs[0][k]), np.asarray(xs[1][k]))
    if t % 3 == 0:  # a dual update: ||z - z_prev|| is reported
      want = np.sqrt(sum(np.sum((np.asarray(states[1][0][1][k], np.float64) -
                                 np.asarray(z_before[k], np.float64)) ** 2) for k in shapes))
      assert float(states[0][0].dual_residual) == pytest.approx(want, rel=1e-5)
  z, u = auxiliary_and_dual(states[0][0])
  for k in shapes:
    np.testing.assert_array_equal(np.asarray(z[k]), np.asarray(states[1][0][1][k]))
    np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(states[1][0][2][k]))
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  lean_bytes = sum(x.nbytes for x in jax.tree.leaves(states[0][0]))
  full_bytes = sum(x.nbytes for x in jax.tree.leaves(states[1][0]))
  assert lean_bytes <= 1.05 * weight_bytes < full_bytes
  assert 0.0 < float(states[0][0].mask_change) < 1.0


def _safe_plus_run(importance, input_scale, grads_scale):
  """One SAFE+ dual update on weights of equal magnitude: the mask must follow P."""
  n_in, n_out = 8, 6
  params = {"dense": {"kernel": jnp.ones((n_in, n_out), jnp.float32),
                      "bias": jnp.zeros((n_out,), jnp.float32)}}
  cfg = SparsifierConfig(name="safe_plus", sparsity=0.5, importance=importance, rho=0.0)
  tx = make_optimizer(cfg, optax.sgd(0.0), 10)
  state = tx.init(params)
  norms = {"dense": {"kernel": jnp.asarray(input_scale, jnp.float32).reshape(n_in, 1),
                     "bias": jnp.zeros([])}}
  grads = {"dense": {"kernel": jnp.asarray(grads_scale, jnp.float32),
                     "bias": jnp.zeros((n_out,))}}
  _, state = tx.update(grads, state, params, value_and_grad_fn=None, input_sq_norms=norms)
  z, _ = auxiliary_and_dual(find_admm_state(state))
  return np.asarray(z["dense"]["kernel"]) != 0


def test_safe_plus_mask_follows_activation_importance():
  scale = np.random.default_rng(0).permutation(8).astype(np.float32) + 1.0
  kept = _safe_plus_run("activation", scale, np.zeros((8, 6)))
  top_rows = np.argsort(-scale)[:4]
  assert kept[top_rows].all() and not kept[np.setdiff1d(np.arange(8), top_rows)].any()


def test_safe_plus_mask_follows_squared_gradients():
  g = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
  kept = _safe_plus_run("grad_sq", np.ones(8), g)
  threshold = np.sort(np.abs(g).ravel())[24]
  np.testing.assert_array_equal(kept, np.abs(g) >= threshold)


def test_input_norms_are_recorded_per_input_feature():
  import flax.linen as nn
  from safe_dist.sparsity import importance

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(3, (3, 3))(x)
      return nn.Dense(2)(x.reshape(x.shape[0], -1))

  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4, 4, 2)), jnp.float32)
  net = Net()
  params = net.init(jax.random.PRNGKey(0), x)["params"]
  _, state = importance.recording_inputs(net.apply)({"params": params}, x,
                                                    mutable=["intermediates"])
  norms = importance.input_sq_norms(params, state["intermediates"])
  want_conv = np.mean(np.asarray(x, np.float64) ** 2, axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(norms["Conv_0"]["kernel"]).ravel(), want_conv, rtol=1e-5)
  assert norms["Dense_0"]["kernel"].shape == (48, 1)
  assert norms["Conv_0"]["bias"].shape == ()


def _nonzeros_per_group(kernel, m):
  """Nonzeros in every group of m consecutive entries along the input axis (-2)."""
  moved = np.moveaxis(np.asarray(kernel), -2, -1)
  return np.count_nonzero(moved.reshape(*moved.shape[:-1], -1, m), axis=-1)


@pytest.mark.parametrize("name", ["safe", "safe_plus", "admm", "iht", "magnitude"])
def test_nm_sparsity_for_every_sparsifier(name):
  rng = np.random.default_rng(5)
  shapes = {"conv": (3, 3, 8, 5), "dense": (12, 5)}
  params = {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in shapes.items()}
  cfg = SparsifierConfig(name=name, scope="nm", n_m=(2, 4), importance="grad_sq",
                         dual_update_interval=2, prune_fraction=0.5, lam=0.1)
  assert cfg.target_sparsity == 0.5
  tx = make_optimizer(cfg, optax.sgd(0.01), 8)
  state = tx.init(params)
  loss = lambda p: sum(jnp.sum(jnp.sin(x["kernel"])) for x in p.values())
  value_and_grad = jax.value_and_grad(loss)
  for _ in range(8):
    _, grads = value_and_grad(params)
    updates, state = tx.update(grads, state, params, value_and_grad_fn=value_and_grad)
    params = optax.apply_updates(params, updates)
  if cfg.uses_admm:
    sparse, _ = auxiliary_and_dual(find_admm_state(state))
  else:
    sparse = params
  projected = cfg.projection.project_params(params)
  for k in shapes:
    assert (_nonzeros_per_group(sparse[k]["kernel"], 4) == 2).all(), k
    assert (_nonzeros_per_group(projected[k]["kernel"], 4) == 2).all(), k
