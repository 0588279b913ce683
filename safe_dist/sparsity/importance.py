"""Diagonal importance P for SAFE+'s generalized projection: scores sqrt(P) * |x|.

Two sources (SPEC.md, "Generalized projection"):
  activation: P_ij = E ||X_j||^2, the mean squared input of feature/channel j of each dense or
      conv layer (Wanda's choice), recorded with flax method interception during the forward
      pass and passed to the optimizer as `input_sq_norms=`.
  grad_sq: P = running mean of the squared (SAM) gradient.
Both are averaged over the batches seen since the previous dual update (the calibration
batches of that update).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity.projection import stat_dtype

IMPORTANCE_SOURCES = ("activation", "grad_sq")
_SOWN = "input_sq_norm"


def _record_input(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
    x = args[0].astype(jnp.float32)
    rows = x.reshape(-1, x.shape[-1])
    module.sow("intermediates", _SOWN, jnp.mean(jnp.square(rows), axis=0))
  return next_fun(*args, **kwargs)


def recording_inputs(fn: Callable) -> Callable:
  """fn(...) run so that every Dense/Conv sows its mean squared input per feature into the
  `intermediates` collection (the caller makes `intermediates` mutable)."""

  def wrapped(*args, **kwargs):
    with nn.intercept_methods(_record_input):
      return fn(*args, **kwargs)
  return wrapped


def input_sq_norms(params, intermediates) -> Any:
  """A tree like `params`: at each kernel (..., in, out) its inputs' E x_j^2 shaped
  (1, .., in, 1) so that it broadcasts over the kernel; a scalar 0 elsewhere."""

  def find(path):
    node = intermediates
    for key in path[:-1]:
      node = node.get(getattr(key, "key", key), {}) if isinstance(node, dict) else {}
    return node.get(_SOWN) if isinstance(node, dict) else None

  def per_leaf(path, p):
    sown = find(path)
    name = getattr(path[-1], "key", None)
    if sown is None or name != "kernel" or p.ndim < 2:
      return jnp.zeros([], jnp.float32)
    mean = sum(sown) / len(sown)  # a module applied several times sows several entries
    return mean.reshape((1,) * (p.ndim - 2) + (p.shape[-2], 1))
  return jax.tree_util.tree_map_with_path(per_leaf, params)


def init_sum(source: str, params) -> Any:
  """Zero accumulator for `source` over the (masked) prunable params (in `stat_dtype`)."""
  dtype = stat_dtype(params)
  if source == "activation":
    return jax.tree.map(lambda p: jnp.zeros((1,) * (p.ndim - 2) + (p.shape[-2], 1), dtype),
                        params)
  return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)


def accumulate(total, seen) -> Any:
  """total + seen, kept in the accumulator's dtype."""
  return jax.tree.map(lambda t, s: t + s.astype(t.dtype), total, seen)


def observation(source: str, masked_like, grads, extra_args: dict) -> Any:
  """This step's value of P at the (masked) prunable leaves."""
  if source == "grad_sq":
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32))),
                        grads)
  if "input_sq_norms" not in extra_args:
    raise ValueError("SAFE+ with activation importance needs update(..., input_sq_norms=...) "
                     "(see safe_dist.sparsity.importance.recording_inputs)")
  return jax.tree.map(lambda m, v: m if isinstance(m, optax.MaskedNode) else v,
                      masked_like, extra_args["input_sq_norms"],
                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def scores(a, importance_mean) -> Any:
  """sqrt(P) * |a|."""
  return jax.tree.map(lambda x, p: jnp.sqrt(p) * jnp.abs(x), a, importance_mean)
