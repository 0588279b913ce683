"""The augmented-Lagrangian (ADMM) part of SAFE as an optax transformation.

Per SPEC.md Algorithm 1, at the start of every step t with t % K == 0:
    a = x + u;  m = Proj mask of a;  z = m * a;  u = (1 - m) * a      (= u + x - z)
and on every step the proximal gradient lambda(t) (x - z + u) is added to the incoming
gradient, before the base optimizer. Wrap it in `optax.masked` so that it only sees the
prunable kernels (see `safe_dist.sparsity.factory`).

Lean state: z and u are both functions of `a` and `m`, and neither changes between dual
updates, so the state holds `a` and `m` packed to one bit per weight (1.03x the bytes of the
weights instead of 2x). z = a * m and u = a - z are recomputed with the same float operations,
so the trajectory is bit-identical to storing z and u.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity import importance as importance_lib
from safe_dist.sparsity.projection import Projection


class ADMMState(NamedTuple):
  """count: steps taken; a = x + u at the last dual update; keep_bits: its mask, bit-packed
  along the last axis; mask_change: fraction of mask entries flipped at the last dual update;
  dual_residual: ||z - z_prev|| at the last dual update;
  importance_sum / importance_count: SAFE+'s P accumulated since the last dual update
  (empty for SAFE and ADMM)."""
  count: jax.Array
  a: optax.Params
  keep_bits: optax.Params
  mask_change: jax.Array
  dual_residual: jax.Array
  importance_sum: Any = ()
  importance_count: Any = ()


def pack_mask(mask: jax.Array) -> jax.Array:
  return jnp.packbits(mask, axis=-1)


def unpack_mask(bits: jax.Array, shape) -> jax.Array:
  return jnp.unpackbits(bits, axis=-1, count=shape[-1]).astype(bool)


def auxiliary_and_dual(state: ADMMState) -> tuple[optax.Params, optax.Params]:
  """(z, u) of an ADMMState (MaskedNode leaves pass through)."""
  z = jax.tree.map(lambda a, bits: a * unpack_mask(bits, a.shape).astype(a.dtype),
                   state.a, state.keep_bits)
  return z, jax.tree.map(jnp.subtract, state.a, z)


def find_admm_state(opt_state) -> ADMMState:
  """The ADMMState inside a (chained, masked) optimizer state."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ADMMState))
           if isinstance(s, ADMMState)]
  if len(found) != 1:
    raise ValueError(f"expected one ADMMState in the optimizer state, found {len(found)}")
  return found[0]


def _count_changed(old_bits, new_bits) -> jax.Array:
  flips = jax.tree.map(lambda o, n: jnp.sum(jax.lax.population_count(o ^ n).astype(jnp.int32)),
                       old_bits, new_bits)
  return sum(jax.tree.leaves(flips))


def admm(projection: Projection, penalty: optax.ScalarOrSchedule, dual_update_interval: int,
         importance: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """Adds lambda(t) (x - z + u) to the gradient and runs the dual update every K steps.

  importance: None projects by |x + u| (SAFE, ADMM); "activation" or "grad_sq" by
  sqrt(P) |x + u| (SAFE+, see `safe_dist.sparsity.importance`).

  Example:
    >>> tx = optax.chain(optax.masked(admm(Projection(0.9), 1e-3, 32), prunable_tree),
    ...                  optax.sgd(0.1, momentum=0.9))
  """
  if dual_update_interval < 1:
    raise ValueError(f"--dual_update_interval must be >= 1, got {dual_update_interval}")
  if importance not in (None,) + importance_lib.IMPORTANCE_SOURCES:
    raise ValueError(f"--importance must be one of {importance_lib.IMPORTANCE_SOURCES}, "
                     f"got {importance!r}")
  penalty_fn = penalty if callable(penalty) else (lambda _: penalty)

  def init_fn(params):
    # An all-ones mask makes u = a - a = 0 and z = x: the first update (t = 0) is a dual update.
    ones = jax.tree.map(lambda x: pack_mask(jnp.ones(x.shape, bool)), params)
    state = ADMMState(count=jnp.zeros([], jnp.int32), a=params, keep_bits=ones,
                      mask_change=jnp.zeros([], jnp.float32),
                      dual_residual=jnp.zeros([], jnp.float32))
    if importance is None:
      return state
    return state._replace(importance_sum=importance_lib.init_sum(importance, params),
                          importance_count=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("admm needs the current params: call update(grads, state, params)")
    if importance is not None:
      seen = importance_lib.observation(importance, params, updates, extra_args)
      state = state._replace(importance_sum=jax.tree.map(jnp.add, state.importance_sum, seen),
                             importance_count=state.importance_count + 1)

    def dual_update(_):
      z_prev, u = auxiliary_and_dual(state)
      a = jax.tree.map(jnp.add, params, u)
      if importance is None:
        scores = jax.tree.map(jnp.abs, a)
      else:
        mean = jax.tree.map(lambda s: s / state.importance_count, state.importance_sum)
        scores = importance_lib.scores(a, mean)
      bits = jax.tree.map(pack_mask, projection.masks(scores))
      size = sum(x.size for x in jax.tree.leaves(a))
      z = jax.tree.map(lambda x, b: x * unpack_mask(b, x.shape).astype(x.dtype), a, bits)
      residual = optax.tree.norm(jax.tree.map(jnp.subtract, z, z_prev)).astype(jnp.float32)
      reset = jax.tree.map(jnp.zeros_like, (state.importance_sum, state.importance_count))
      return (a, bits, _count_changed(state.keep_bits, bits) / size, residual) + reset

    a, bits, change, residual, imp_sum, imp_count = jax.lax.cond(
        state.count % dual_update_interval == 0, dual_update,
        lambda _: (state.a, state.keep_bits, state.mask_change, state.dual_residual,
                   state.importance_sum, state.importance_count), None)
    new_state = ADMMState(count=state.count + 1, a=a, keep_bits=bits, mask_change=change,
                          dual_residual=residual, importance_sum=imp_sum,
                          importance_count=imp_count)
    z, u = auxiliary_and_dual(new_state)
    lam = penalty_fn(state.count)
    updates = jax.tree.map(lambda g, x, z_, u_: g + (lam * (x - z_ + u_)).astype(g.dtype),
                           updates, params, z, u)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
