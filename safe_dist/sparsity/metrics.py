"""What a sparsifier reports about itself, read from the full optimizer state.

The ADMM state is found by type (like `optax.tree.get` finds SAM's `perturbed_loss`), so
callers need not know which sparsifier built the state.
"""

import jax
import optax

from safe_dist.sparsity.admm import auxiliary_and_dual, find_admm_state
from safe_dist.sparsity.projection import prunable_leaves, stat_dtype, tree_norm, zero_fraction


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def sparse_iterate(params, opt_state):
  """The sparse network the method maintains, shaped like `params`: for SAFE/SAFE+/ADMM z at
  the prunable kernels and x elsewhere; otherwise `params` itself (GMP, IHT and magnitude mask
  x in place; dense: x)."""
  state = find_admm_state(opt_state)
  if state is None:
    return params
  z, _ = auxiliary_and_dual(state)
  return jax.tree.map(lambda z_, x: x if _is_masked(z_) else z_, z, params, is_leaf=_is_masked)


def sparsifier_metrics(params, opt_state) -> dict[str, jax.Array]:
  """Scalars for the training log (jittable), in `stat_dtype(params)`.

  Always "sparsity/z": fraction of zeros of the prunable kernels of `sparse_iterate`. With an
  ADMM state also, over the prunable kernels: "admm/constraint_gap" ||x - z|| / ||x||,
  "admm/primal_residual" ||x - z||, "admm/dual_norm" ||u||, and from the latest dual update
  "admm/mask_change" and "admm/dual_residual" ||z - z_prev|| (0 before the first), and
  "admm/lambda", the penalty of the last step.
  """
  dtype = stat_dtype(params)
  metrics = {"sparsity/z": zero_fraction(prunable_leaves(sparse_iterate(params, opt_state)),
                                         dtype)}
  state = find_admm_state(opt_state)
  if state is None:
    return metrics
  z, u = (jax.tree.leaves(t) for t in auxiliary_and_dual(state))
  x = prunable_leaves(params)
  gap = tree_norm([a.astype(dtype) - b.astype(dtype) for a, b in zip(x, z)], dtype)
  metrics.update({
      "admm/constraint_gap": gap / tree_norm(x, dtype),
      "admm/primal_residual": gap,
      "admm/dual_norm": tree_norm(u, dtype),
      "admm/mask_change": state.mask_change.astype(dtype),
      "admm/dual_residual": state.dual_residual.astype(dtype),
      "admm/lambda": state.penalty.astype(dtype),
  })
  return metrics
