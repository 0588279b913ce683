"""What each linear kernel of a block sees of the calibration data, recorded in one dense pass.

For every `nn.Dense` of the block: the token count, the per-input sum of squares (Wanda's
||X_j||^2, SAFE+'s mean x_j^2) and, when asked, the Gram matrix sum x x^T (SparseGPT's
Hessian H = (2/n) sum x x^T). Recorded with flax method interception; under jit over inputs
sharded on the batch, each sum is one reduction across the data axes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_COLLECTION = "linear_inputs"


def _recorder(with_gram: bool):
  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense):
      rows = args[0].astype(jnp.float32).reshape(-1, args[0].shape[-1])
      module.sow(_COLLECTION, "count", jnp.asarray(rows.shape[0], jnp.float32))
      module.sow(_COLLECTION, "sq_sum", jnp.sum(jnp.square(rows), axis=0))
      if with_gram:
        module.sow(_COLLECTION, "gram", rows.T @ rows)
    return next_fun(*args, **kwargs)
  return record


def block_outputs_and_input_sums(block: nn.Module, params, x: jax.Array,
                                 with_gram: bool) -> tuple[jax.Array, Any]:
  """(block(x), {path of each Dense: {"count", "sq_sum", "gram"?}}) for one chunk of inputs."""
  with nn.intercept_methods(_recorder(with_gram)):
    y, recorded = block.apply({"params": params}, x, mutable=[_COLLECTION])
  sums = jax.tree.map(lambda t: t[0], recorded[_COLLECTION],
                      is_leaf=lambda t: isinstance(t, tuple))  # each Dense runs once
  return y, sums


def add(total, sums):
  return sums if total is None else jax.tree.map(jnp.add, total, sums)
