"""The augmented-Lagrangian (ADMM) part of SAFE as an optax transformation.

Per SPEC.md Algorithm 1, at the start of every step t with t % K == 0:
    a = x + u;  m = Proj mask of a;  z = m * a;  u = (1 - m) * a      (= u + x - z)
and on every step the proximal gradient lambda(t) (x - z + u) is added to the incoming
gradient, before the base optimizer. Wrap it in `optax.masked` so that it only sees the
prunable kernels (see `safe_dist.sparsity.factory`).
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity.masking import Projection

# scores_fn(a, state) -> tree of non-negative projection scores; |a| for SAFE/ADMM.
ScoresFn = Callable[[optax.Params], optax.Params]


class ADMMState(NamedTuple):
  """count: steps taken; z: sparse auxiliary variable; u: scaled dual variable."""
  count: jax.Array
  z: optax.Params
  u: optax.Params


def _abs_scores(tree):
  return jax.tree.map(jnp.abs, tree)


def _apply_mask(tree, masks):
  return jax.tree.map(lambda x, m: x * m.astype(x.dtype), tree, masks)


def admm(projection: Projection, penalty: optax.ScalarOrSchedule, dual_update_interval: int,
         scores_fn: Optional[ScoresFn] = None) -> optax.GradientTransformation:
  """Adds lambda(t) (x - z + u) to the gradient and runs the dual update every K steps.

  Example:
    >>> tx = optax.chain(optax.masked(admm(Projection(0.9), 1e-3, 32), prunable_tree),
    ...                  optax.sgd(0.1, momentum=0.9))
  """
  if dual_update_interval < 1:
    raise ValueError(f"--dual_update_interval must be >= 1, got {dual_update_interval}")
  scores_fn = scores_fn or _abs_scores
  penalty_fn = penalty if callable(penalty) else (lambda _: penalty)

  def init_fn(params):
    z = _apply_mask(params, projection.masks(scores_fn(params)))
    return ADMMState(count=jnp.zeros([], jnp.int32), z=z, u=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("admm needs the current params: call update(grads, state, params)")

    def dual_update(_):
      a = jax.tree.map(jnp.add, params, state.u)
      masks = projection.masks(scores_fn(a))
      z = _apply_mask(a, masks)
      return z, jax.tree.map(jnp.subtract, a, z)

    z, u = jax.lax.cond(state.count % dual_update_interval == 0, dual_update,
                        lambda _: (state.z, state.u), None)
    lam = penalty_fn(state.count)
    updates = jax.tree.map(lambda g, x, z_, u_: g + (lam * (x - z_ + u_)).astype(g.dtype),
                           updates, params, z, u)
    return updates, ADMMState(count=state.count + 1, z=z, u=u)

  return optax.GradientTransformation(init_fn, update_fn)
