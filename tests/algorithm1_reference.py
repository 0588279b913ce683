"""Algorithm 1 of SPEC.md in float64 numpy on a separable quadratic, and the check that a jax
sparsifier follows it (shared by test_sparsifiers.py and test_float64.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpy_reference import keep_mask_global
from safe_dist import optim
from safe_dist.sparsity import SparsifierConfig, admm_variables, make_optimizer
from safe_dist.sparsity import schedules

ADMM_METHODS = ("safe", "safe_plus", "admm")

KERNEL_SHAPES = {"conv/kernel": (3, 3, 2, 4), "dense/kernel": (12, 5)}  # in tree order


def nest(flat):
  """{"a/b": x} -> {"a": {"b": x}} (flax-style parameter names)."""
  out = {}
  for path, value in flat.items():
    outer, inner = path.split("/")
    out.setdefault(outer, {})[inner] = value
  return out


def problem(seed):
  """A separable quadratic f(w) = 1/2 sum c (w - t)^2 over two kernels and a bias."""
  rng = np.random.default_rng(seed)
  shapes = {**KERNEL_SHAPES, "dense/bias": (5,)}
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  curv = {k: rng.uniform(0.5, 2.0, size=s) for k, s in shapes.items()}
  target = {k: rng.normal(size=s) for k, s in shapes.items()}
  return params, curv, target


def np_keep_mask(arrays, sparsity):
  """Global exact top-k on |a|: drop floor(s N), ties dropped from the highest position."""
  scores = [np.abs(a) for a in arrays]
  return keep_mask_global(scores, int(np.floor(sparsity * sum(a.size for a in scores))))


def reference_run(cfg, params, curv, target, lr_fn, steps, total_steps, wd, momentum):
  """Algorithm 1 of SPEC.md in float64 numpy, with SGD + momentum + coupled weight decay:
  z = Proj(x0), u = 0; dual update at the start of step t when t > 0 and t % K == 0."""
  x = {k: v.copy() for k, v in params.items()}
  kernels = list(KERNEL_SHAPES)
  grad = lambda w: {k: curv[k] * (w[k] - target[k]) for k in w}
  lam_fn = cfg.penalty(total_steps)
  masks = np_keep_mask([x[k] for k in kernels], cfg.sparsity)
  z = {k: x[k] * m for k, m in zip(kernels, masks)}
  u = {k: np.zeros_like(x[k]) for k in kernels}
  trace = {k: np.zeros_like(v) for k, v in x.items()}
  for t in range(steps):
    if cfg.name in ADMM_METHODS and t > 0 and t % cfg.dual_update_interval == 0:
      a = {k: x[k] + u[k] for k in kernels}
      masks = np_keep_mask([a[k] for k in kernels], cfg.sparsity)
      for k, m in zip(kernels, masks):
        z[k] = a[k] * m
        u[k] = a[k] - z[k]
    g = grad(x)
    if cfg.name in ADMM_METHODS and cfg.rho > 0:
      norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
      g = grad({k: x[k] + cfg.rho * g[k] / norm for k in x})
    if cfg.name in ADMM_METHODS:
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
      for k, m in zip(kernels, np_keep_mask([x[k] for k in kernels], sp)):
        x[k] = x[k] * m
  return x, z, u


def quadratic_value_and_grad(curv, target):
  """value_and_grad of the quadratic of `_problem` on nested params."""
  curv, target = nest(curv), nest(target)
  loss_fn = lambda w: sum(jax.tree.leaves(jax.tree.map(
      lambda x, c, t: 0.5 * jnp.sum(c * (x - t) ** 2), w, curv, target)))
  return jax.value_and_grad(loss_fn)


def jax_run(cfg, params, curv, target, lr_fn, steps, total_steps, wd, momentum,
             dtype=jnp.float32):
  value_and_grad = quadratic_value_and_grad(curv, target)
  base = optim.make_base_optimizer(
      optim.OptimizerConfig(lr=0.1, weight_decay=wd, momentum=momentum), lr_fn)
  tx = make_optimizer(cfg, base, total_steps)
  x = jax.tree.map(lambda v: jnp.asarray(v, dtype), nest(params))
  state = tx.init(x)

  @jax.jit
  def step(x, state):
    _, g = value_and_grad(x)
    updates, state = tx.update(g, state, x, value_and_grad_fn=value_and_grad)
    return optax.apply_updates(x, updates), state

  for _ in range(steps):
    x, state = step(x, state)
  return x, state


def at(tree, k):
  return np.asarray(tree[k.split("/")[0]][k.split("/")[1]])


def check_against_reference(name, rho, schedule, seed, steps=11, dtype=jnp.float32, tol=2e-5):
  """The jax sparsifier and `_reference_run` agree on x, and on z and u for SAFE/ADMM."""
  params, curv, target = problem(seed)
  total, wd, momentum = 20, 1e-3, 0.9
  cfg = SparsifierConfig(name=name, sparsity=0.7, lam=0.5, lambda_schedule=schedule,
                         dual_update_interval=3, rho=rho, sp_schedule="cubic", end_fraction=0.4)
  lr_fn = optax.cosine_decay_schedule(0.05, total)
  want_x, want_z, want_u = reference_run(cfg, params, curv, target, lr_fn, steps, total, wd,
                                          momentum)
  got_x, state = jax_run(cfg, params, curv, target, lr_fn, steps, total, wd, momentum, dtype)
  for k in params:
    assert at(got_x, k).dtype == dtype
    np.testing.assert_allclose(at(got_x, k), want_x[k], rtol=tol, atol=tol, err_msg=k)
  if cfg.name in ADMM_METHODS:
    z, u, _ = admm_variables(state)
    for k in KERNEL_SHAPES:
      np.testing.assert_allclose(at(z, k), want_z[k], rtol=tol, atol=tol, err_msg=k)
      np.testing.assert_allclose(at(u, k), want_u[k], rtol=tol, atol=tol, err_msg=k)
    n_kernel = sum(np.prod(s) for s in KERNEL_SHAPES.values())
    assert sum(int(np.sum(at(z, k) == 0)) for k in KERNEL_SHAPES) == int(0.7 * n_kernel)
  return state
