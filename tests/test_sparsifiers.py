"""SAFE, ADMM, GMP, IHT and one-shot magnitude against a float64 numpy reference of the update rules."""

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
from algorithm1_reference import (ADMM_METHODS, KERNEL_SHAPES, at, check_against_reference,
                                  nest, np_keep_mask, problem, quadratic_value_and_grad)
from safe_dist.sparsity import (Projection, SparsifierConfig, admm, admm_variables,
                                auxiliary_and_dual, make_optimizer, prunable_tree,
                                sparse_iterate, sparsifier_metrics)
from safe_dist.sparsity import schedules

@pytest.mark.parametrize("name,rho,schedule", [("safe", 0.05, "cosine"), ("admm", 0.0, "linear"),
                                               ("safe", 0.1, "constant"), ("iht", 0.0, "cosine")])
@pytest.mark.parametrize("seed", [0, 1])
def test_update_rule_matches_float64_reference(name, rho, schedule, seed):
  check_against_reference(name, rho, schedule, seed)


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_first_dual_update_comes_after_k_steps(steps):
  """z = Proj(x0) and u = 0 through the first K = 3 steps; the first dual update at t = K."""
  state = check_against_reference("safe", 0.05, "cosine", 0, steps=steps)
  params, _, _ = problem(0)
  z, u, keep = admm_variables(state)
  if steps <= 3:
    x0 = [params[k].astype(np.float32) for k in KERNEL_SHAPES]
    for k, want in zip(KERNEL_SHAPES, np_keep_mask(x0, 0.7)):
      np.testing.assert_array_equal(at(u, k), 0.0)
      np.testing.assert_array_equal(at(keep, k), want)
      np.testing.assert_array_equal(at(z, k), x0[list(KERNEL_SHAPES).index(k)] * want)
  else:
    assert any(np.any(at(u, k) != 0) for k in KERNEL_SHAPES)


def _fixed_path_updates(cfg, steps=5):
  """updates of make_optimizer(cfg) with an identity base optimizer (the update is the
  modified gradient) along a fixed path of x, so that every config sees the same x."""
  params, curv, target = problem(3)
  value_and_grad = quadratic_value_and_grad(curv, target)
  tx = make_optimizer(cfg, optax.identity(), 10)
  x0, x1 = (jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), nest(p)) for p in (params, target))
  state = tx.init(x0)
  update = jax.jit(lambda g, s, x: tx.update(g, s, x, value_and_grad_fn=value_and_grad))
  out = []
  for t in range(steps):  # from x0 towards the minimum: the ranks of |x| change
    x = jax.tree.map(lambda a, b: a + 0.2 * t * (b - a), x0, x1)
    grads = value_and_grad(x)[1]
    updates, state = update(grads, state, x)
    out.append((x, grads, updates, state))
  return out, value_and_grad


def test_penalty_and_sam_only_touch_what_they_should():
  """ADMM adds lambda (x - z + u) at the kernels only; SAFE differs from ADMM by exactly the
  SAM gradient correction; SAFE with rho = 0 is ADMM bit for bit."""
  common = dict(sparsity=0.7, lam=0.5, lambda_schedule="constant", dual_update_interval=2)
  admm_run, value_and_grad = _fixed_path_updates(SparsifierConfig(name="admm", **common))
  safe_run, _ = _fixed_path_updates(SparsifierConfig(name="safe", rho=0.05, **common))
  rho0_run, _ = _fixed_path_updates(SparsifierConfig(name="safe", rho=0.0, **common))
  for (x, g, upd, state), (_, _, safe_upd, safe_state), (_, _, rho0_upd, _) in zip(
      admm_run, safe_run, rho0_run):
    z, u, _ = admm_variables(state)
    assert isinstance(z["dense"]["bias"], optax.MaskedNode)
    np.testing.assert_array_equal(upd["dense"]["bias"], g["dense"]["bias"])  # no penalty
    for k in KERNEL_SHAPES:
      penalty = 0.5 * (at(x, k) - at(z, k) + at(u, k))
      assert np.abs(penalty).max() > 1e-3
      np.testing.assert_allclose(at(upd, k) - at(g, k), penalty, rtol=1e-5, atol=1e-6)
    # SAFE = ADMM with the gradient at x + rho g / ||g|| in place of the gradient at x
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, d: w + 0.05 * d / norm, x, g)
    loss, g_sam = value_and_grad(perturbed)
    assert float(optax.tree.get(safe_state, "perturbed_loss")) == pytest.approx(float(loss))
    sam_change = jax.tree.map(jnp.subtract, g_sam, g)
    assert float(optax.tree.norm(sam_change)) > 1e-3
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a - b, c, rtol=1e-5, atol=1e-6),
                 safe_upd, upd, sam_change)
    jax.tree.map(np.testing.assert_array_equal, rho0_upd, upd)
  params, _, _ = problem(3)
  assert jax.tree.leaves(prunable_tree(nest(params))) == [True, False, True]


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
                                         ({"rho": -1.0}, "--rho"),
                                         ({"lam": -1.0}, "--lambda"),
                                         ({"importance": "hessian"}, "--importance"),
                                         ({"sp_schedule": "step"}, "--sp_schedule"),
                                         ({"scope": "global", "n_m": (2, 4)}, "--nm"),
                                         ({"scope": "nm"}, "--nm"),
                                         ({"n_m": (4, 4)}, "--nm")])
def test_invalid_config_names_the_flag(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    SparsifierConfig(**kwargs)


def _built_sparsifier(*fiddlers, **fields):
  """The SparsifierConfig of fdl.build(configs.reference()) after `fiddlers`, with `fields`
  set the way the reference flags are (`--sparsifier admm` sets sparsifier.name)."""
  cfg = configs.reference()
  for fiddler in fiddlers:
    cfg = fiddler(cfg)
  for key, value in fields.items():
    setattr(cfg.sparsifier, key, value)
  return fdl.build(cfg).sparsifier


def test_lambda_schedule_defaults_per_method_and_explicit_wins():
  assert _built_sparsifier().resolved_lambda_schedule == "cosine"  # SAFE: the reference runs
  assert _built_sparsifier(name="safe_plus").resolved_lambda_schedule == "cosine"
  for admm_cfg in (_built_sparsifier(configs.admm), _built_sparsifier(name="admm")):
    assert admm_cfg.lambda_schedule is None
    assert admm_cfg.resolved_lambda_schedule == "constant"  # as the official ADMM
  # --sparsifier admm --lambda_schedule cosine: the explicit schedule wins
  for explicit in (_built_sparsifier(configs.admm, lambda_schedule="cosine"),
                   _built_sparsifier(name="admm", lambda_schedule="cosine")):
    assert explicit.resolved_lambda_schedule == "cosine"
  cfg = SparsifierConfig(name="admm", lam=0.3)
  assert float(cfg.penalty(100)(0)) == pytest.approx(0.3)
  assert float(SparsifierConfig(lam=0.3).penalty(100)(0)) == 0.0


def _two_array_admm(projection, penalty_fn, interval):
  """The textbook form that stores z and u (2x the weights), for the lean-state test."""

  def init_fn(params):  # z = Proj(x0), u = 0
    z = jax.tree.map(lambda x, m: x * m.astype(x.dtype), params,
                     projection.masks(jax.tree.map(jnp.abs, params)))
    return (jnp.zeros([], jnp.int32), z, jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params):
    count, z, u = state

    def dual_update(_):
      a = jax.tree.map(jnp.add, params, u)
      new_z = jax.tree.map(lambda x, m: x * m.astype(x.dtype), a,
                           projection.masks(jax.tree.map(jnp.abs, a)))
      return new_z, jax.tree.map(jnp.subtract, a, new_z)

    z, u = jax.lax.cond((count > 0) & (count % interval == 0), dual_update, lambda _: (z, u),
                        None)
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
    if t < 3:  # no dual update yet
      assert float(states[0][0].dual_residual) == float(states[0][0].mask_change) == 0.0
    elif t % 3 == 0:  # a dual update: ||z - z_prev|| is reported
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
  """SAFE+'s first dual update (t = K = 1) on weights of equal magnitude: the mask must
  follow P."""
  n_in, n_out = 8, 6
  params = {"dense": {"kernel": jnp.ones((n_in, n_out), jnp.float32),
                      "bias": jnp.zeros((n_out,), jnp.float32)}}
  cfg = SparsifierConfig(name="safe_plus", sparsity=0.5, importance=importance, rho=0.0,
                         dual_update_interval=1)
  tx = make_optimizer(cfg, optax.sgd(0.0), 10)
  state = tx.init(params)
  norms = {"dense": {"kernel": jnp.asarray(input_scale, jnp.float32).reshape(n_in, 1),
                     "bias": jnp.zeros([])}}
  grads = {"dense": {"kernel": jnp.asarray(grads_scale, jnp.float32),
                     "bias": jnp.zeros((n_out,))}}
  for _ in range(2):
    _, state = tx.update(grads, state, params, value_and_grad_fn=None, input_sq_norms=norms)
  z, _, _ = admm_variables(state)
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
  sparse = sparse_iterate(params, state)
  projected = cfg.projection.project_params(params)
  for k in shapes:
    assert (_nonzeros_per_group(sparse[k]["kernel"], 4) == 2).all(), k
    assert (_nonzeros_per_group(projected[k]["kernel"], 4) == 2).all(), k


@pytest.mark.parametrize("name", ["admm", "safe", "gmp", "none"])
def test_sparsifiers_report_on_themselves(name):
  """sparse_iterate, admm_variables and sparsifier_metrics (jitted) from the full state."""
  cfg = SparsifierConfig(name=name, sparsity=0.7, lam=0.5, lambda_schedule="linear",
                         dual_update_interval=2, prune_interval=1, end_fraction=0.2)
  steps = 3
  run, _ = _fixed_path_updates(cfg, steps)
  x, _, _, state = run[-1]
  metrics = jax.jit(sparsifier_metrics)(x, state)
  iterate = sparse_iterate(x, state)
  assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())
  kernels = [at(iterate, k) for k in KERNEL_SHAPES]
  want_zeros = sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
  assert float(metrics["sparsity/z"]) == pytest.approx(want_zeros)
  if name not in ADMM_METHODS:
    assert set(metrics) == {"sparsity/z"}
    assert iterate is x
    with pytest.raises(ValueError, match="no ADMM state"):
      admm_variables(state)
    return
  z, u, keep = admm_variables(state)
  np.testing.assert_array_equal(at(iterate, "dense/bias"), at(x, "dense/bias"))
  for k in KERNEL_SHAPES:
    np.testing.assert_array_equal(at(iterate, k), at(z, k))
    np.testing.assert_array_equal(at(z, k) != 0, at(keep, k))
  assert float(metrics["sparsity/z"]) == pytest.approx(0.7, abs=0.01)
  x_k = [at(x, k).astype(np.float64) for k in KERNEL_SHAPES]
  gap = np.sqrt(sum(np.sum((a - at(z, k)) ** 2) for a, k in zip(x_k, KERNEL_SHAPES)))
  want = {"admm/primal_residual": gap,
          "admm/constraint_gap": gap / np.sqrt(sum(np.sum(a ** 2) for a in x_k)),
          "admm/dual_norm": np.sqrt(sum(np.sum(at(u, k) ** 2) for k in KERNEL_SHAPES)),
          "admm/lambda": float(cfg.penalty(10)(steps - 1))}
  for key, value in want.items():
    assert float(metrics[key]) == pytest.approx(value, rel=1e-5), key
  assert 0.0 < float(metrics["admm/mask_change"]) < 1.0  # the dual update at t = 2
  assert float(metrics["admm/dual_residual"]) > 0.0
  first = sparsifier_metrics(*run[0][::3])  # (x, state) after step 0: no dual update yet
  assert float(first["admm/mask_change"]) == float(first["admm/dual_residual"]) == 0.0


@pytest.mark.parametrize("name,schedule", [("safe", None), ("admm", None), ("safe", "linear")])
def test_penalty_pull_is_the_float64_sum_of_lr_times_lambda(name, schedule):
  from safe_dist import optim  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng()
  per_epoch, epochs = int(rng.integers(20, 60)), int(rng.integers(2, 6))
  total, lr, lam = per_epoch * epochs, rng.uniform(0.01, 0.2), rng.uniform(1e-4, 1e-1)
  momentum, warmup = rng.uniform(0.0, 0.95), int(rng.integers(1, per_epoch))
  lr_fn = optim.learning_rate_schedule(
      optim.OptimizerConfig(lr=lr, warmup_epochs=warmup / per_epoch), per_epoch, total)
  cfg = SparsifierConfig(name=name, lam=lam, lambda_schedule=schedule)
  expected = 0.0
  for t in range(total):  # linear warm-up, then cosine decay; lambda: SPEC.md's schedules
    rate = lr * t / warmup if t < warmup else (
        lr * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup))))
    frac = t / total
    penalty = {"constant": lam, "linear": lam * frac,
               "cosine": lam * (1 - np.cos(np.pi * frac)) / 2}[cfg.resolved_lambda_schedule]
    expected += rate * penalty / (1 - momentum)
  np.testing.assert_allclose(cfg.penalty_pull_of(lr_fn, total, momentum), expected, rtol=1e-5)
  assert SparsifierConfig(name="gmp").penalty_pull_of(lr_fn, total, momentum) is None
  # --penalty_pull: lambda scaled so that the pull is P (P is linear in lambda).
  target = rng.uniform(1.0, 50.0)
  resolved = SparsifierConfig(name=name, lambda_schedule=schedule,
                              penalty_pull=target).resolve_penalty_pull(lr_fn, total, momentum)
  assert resolved.penalty_pull is None and cfg.resolve_penalty_pull(lr_fn, total, momentum) is cfg
  np.testing.assert_allclose(resolved.lam, lam * target / expected, rtol=1e-5)
  np.testing.assert_allclose(resolved.penalty_pull_of(lr_fn, total, momentum), target, rtol=1e-5)


def test_penalty_pull_is_refused_where_it_means_nothing():
  from safe_dist import optim  # pylint: disable=import-outside-toplevel
  from trainer_helpers import debug_experiment  # pylint: disable=import-outside-toplevel
  for fields, message in (({"name": "gmp", "penalty_pull": 10.0}, "--sparsifier gmp has no "),
                          ({"name": "safe", "penalty_pull": 0.0}, "must be > 0")):
    with pytest.raises(ValueError, match=message):
      SparsifierConfig(**fields)
  with pytest.raises(ValueError, match="--penalty_pull needs --optimizer sgd.*adamw"):
    debug_experiment(**{"sparsifier.penalty_pull": 10.0, "optimizer.name": "adamw"})
  with pytest.raises(ValueError, match="must be resolved"):  # never silently the config's lam
    make_optimizer(SparsifierConfig(penalty_pull=10.0), optim.make_base_optimizer(
        optim.OptimizerConfig(), optax.constant_schedule(0.1)), 100)


def test_run_trains_with_the_lambda_its_penalty_pull_resolves_to():
  """ADMM (constant lambda) on the debug config with --penalty_pull P: the run's lambda, its
  logged pull and the lambda the first train step applies are the resolved ones."""
  from safe_dist import run_setup  # pylint: disable=import-outside-toplevel
  from trainer_helpers import debug_experiment  # pylint: disable=import-outside-toplevel
  target = float(np.random.default_rng().uniform(2.0, 30.0))
  exp = debug_experiment(**{"sparsifier.name": "admm", "sparsifier.rho": 0.0,
                            "sparsifier.penalty_pull": target})
  run = run_setup.setup(exp)
  unit = run.exp.sparsifier.penalty_pull_of(run.lr_fn, run.plan.total_steps,
                                            exp.optimizer.momentum) / run.exp.sparsifier.lam
  np.testing.assert_allclose(run.penalty_pull, target, rtol=1e-5)
  np.testing.assert_allclose(run.exp.sparsifier.lam, target / unit, rtol=1e-5)
  assert run.exp.sparsifier.lam != exp.sparsifier.lam
  state = run.init(exp.train.seed)
  batch = {"image": jnp.ones((exp.train.batch_size, *run.info.input_shape), jnp.float32),
           "label": jnp.zeros((exp.train.batch_size,), jnp.int32)}
  _, metrics = run.train_step(state, batch)
  np.testing.assert_allclose(float(metrics["admm/lambda"]), run.exp.sparsifier.lam, rtol=1e-6)
