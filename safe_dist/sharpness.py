"""Hessian sharpness of a loss over params: Hessian-vector products, top eigenvalue, trace.

Every estimator is a single jittable function (loops are `lax.fori_loop`), so the caller can
`jax.jit` it with the same in_shardings as the train step. Vectors are pytrees shaped like
params; norms and inner products run in float32 over the whole tree.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from safe_dist.steps import cross_entropy

HvpFn = Callable[[Any, Any, Any], Any]  # hvp(params, batch, v) -> H(params, batch) v


def make_hvp(loss_fn: Callable[[Any, Any], jax.Array]) -> HvpFn:
  """hvp(params, batch, v) for loss_fn(params, batch) -> scalar, forward-over-reverse."""

  def hvp(params, batch, v):
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
    return jax.jvp(grad_fn, (params,), (v,))[1]

  return hvp


def make_model_loss(model: nn.Module) -> Callable:
  """loss_fn(params, batch_stats, batch): eval-mode cross-entropy of a flax model.

  `batch_stats` may be `{}` for models without BatchNorm. Padding weights
  (`batch["weight"]`) are honoured when present. For `make_hvp`, bind the statistics
  through the batch: `make_hvp(lambda p, b: loss_fn(p, b[0], b[1]))` with batch
  `(batch_stats, batch)`, or use `make_sharpness_fn`.
  """

  def loss_fn(params, batch_stats, batch):
    variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {
        "params": params}
    logits = model.apply(variables, batch["image"], train=False)
    return cross_entropy(logits, batch["label"], batch.get("weight"))

  return loss_fn


def tree_vdot(a, b) -> jax.Array:
  """<a, b> over all leaves, in float32."""
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b))
  return sum(leaves, jnp.zeros((), jnp.float32))


def _tree_scale(tree, s):
  return jax.tree.map(lambda x: (x.astype(jnp.float32) * s).astype(x.dtype), tree)


def _random_like(key, tree, sampler):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([sampler(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def max_eigenvalue(hvp_fn: HvpFn, params, batch, key, num_iters: int = 20) -> jax.Array:
  """Power iteration: the Rayleigh quotient of the eigenvalue largest in magnitude (signed).

  Uses `num_iters` Hessian-vector products; the returned value is v^T H v for the unit
  vector after `num_iters - 1` power steps.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  v = _random_like(key, params, jax.random.normal)
  v = _tree_scale(v, jax.lax.rsqrt(tree_vdot(v, v)))

  def body(_, carry):
    v, _ = carry
    hv = hvp_fn(params, batch, v)
    eig = tree_vdot(v, hv)
    norm = jnp.sqrt(tree_vdot(hv, hv))
    return _tree_scale(hv, 1.0 / jnp.maximum(norm, 1e-30)), eig

  _, eig = jax.lax.fori_loop(0, num_iters, body, (v, jnp.zeros((), jnp.float32)))
  return eig


def hessian_trace(hvp_fn: HvpFn, params, batch, key, num_samples: int = 10) -> jax.Array:
  """Hutchinson's estimator: the mean of v^T H v over Rademacher vectors v."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")

  def body(i, total):
    v = _random_like(jax.random.fold_in(key, i), params, jax.random.rademacher)
    return total + tree_vdot(v, hvp_fn(params, batch, v))

  total = jax.lax.fori_loop(0, num_samples, body, jnp.zeros((), jnp.float32))
  return total / num_samples


def make_sharpness_fn(model: nn.Module, num_iters: int = 20, num_samples: int = 10) -> Callable:
  """sharpness(params, batch_stats, batch, key) -> {"sharpness/hessian_max_eig", ...trace}.

  One pure function of explicit state, to be jitted with the train step's shardings.
  A count of 0 skips that estimator.
  """
  loss_fn = make_model_loss(model)
  hvp_fn = make_hvp(lambda p, aux: loss_fn(p, aux[0], aux[1]))

  def sharpness(params, batch_stats, batch, key):
    eig_key, trace_key = jax.random.split(key)
    out = {}
    if num_iters:
      out["sharpness/hessian_max_eig"] = max_eigenvalue(
          hvp_fn, params, (batch_stats, batch), eig_key, num_iters)
    if num_samples:
      out["sharpness/hessian_trace"] = hessian_trace(
          hvp_fn, params, (batch_stats, batch), trace_key, num_samples)
    return out

  return sharpness
