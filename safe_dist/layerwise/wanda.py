"""Wanda (Sun et al., 2023) on one linear kernel: prune by |w_ij| * ||X_i||_2, no weight update.

Our kernels are (in, out) with y = x @ w; scores are compared within each output column (the
paper's output neuron), or, for N:M, within every M consecutive inputs of a column.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from safe_dist.sparsity.topk import _num_dropped, prune_mask


def _keep_per_output(scores: jax.Array, sparsity) -> jax.Array:
  """Drops exactly floor(sparsity * in) lowest scores of every column; among equal scores the
  lower input is kept. Sorts along the inputs only, so columns sharded over devices stay local."""
  n_in = scores.shape[0]
  order = jnp.argsort(scores, axis=0, stable=True, descending=True)
  rank = jnp.argsort(order, axis=0)  # the inverse permutation: each entry's place in its column
  return rank < n_in - _num_dropped(sparsity, n_in)


@jax.jit(static_argnames=("n_m", "sharding"))
def wanda(w: jax.Array, act_sq_norm: jax.Array, sparsity, n_m: Optional[tuple[int, int]] = None,
          sharding: Optional[NamedSharding] = None) -> tuple[jax.Array, jax.Array]:
  """Wanda of one kernel w (in, out); act_sq_norm (in,): sum over calibration tokens of x_i^2.

  Args:
    sparsity: fraction dropped in each output column (may be traced); ignored with `n_m`.
    n_m: (N, M): keep N of every M consecutive inputs per output (as `prune_mask`).
    sharding: optional `NamedSharding` of w, passed to `prune_mask` for N:M inside jit.
  Returns:
    (pruned w, keep-mask).
  """
  # float32 at least, as the reference (half-precision |W| times float32 norms)
  dtype = jnp.promote_types(jnp.result_type(w, act_sq_norm), jnp.float32)
  scores = jnp.abs(w).astype(dtype) * jnp.sqrt(act_sq_norm.astype(dtype))[:, None]
  if n_m is None:
    keep = _keep_per_output(scores, sparsity)
  else:
    keep = prune_mask(scores, None, n_m=n_m, shardings=sharding)
  return jnp.where(keep, w, 0), keep
