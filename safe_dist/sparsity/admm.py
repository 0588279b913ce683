"""The augmented-Lagrangian (ADMM) part of SAFE as an optax transformation.

Per SPEC.md Algorithm 1: z = Proj(x0), u = 0 at init; then at the start of every step t with
t > 0 and t % K == 0 (the official code updates after the step with t % K == K - 1: the same)
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
from safe_dist.sparsity.projection import Projection, stat_dtype, tree_norm


class ADMMState(NamedTuple):
  """count: steps taken; a = x + u at the last dual update (z0 = Proj(x0) at init, so that
  u0 = a - z0 = 0); keep_bits: its mask, bit-packed along the last axis; mask_change: fraction
  of mask entries flipped at the last dual update; dual_residual: ||z - z_prev|| at the last
  dual update (both 0 before the first); penalty: lambda(t) of the last step;
  importance_sum / importance_count: SAFE+'s P accumulated since the last dual update
  (empty for SAFE and ADMM). Scalars are in `stat_dtype` of the params."""
  count: jax.Array
  a: optax.Params
  keep_bits: optax.Params
  mask_change: jax.Array
  dual_residual: jax.Array
  penalty: jax.Array
  importance_sum: Any = ()
  importance_count: Any = ()


def pack_mask(mask: jax.Array) -> jax.Array:
  return jnp.packbits(mask, axis=-1)


def unpack_mask(bits: jax.Array, shape) -> jax.Array:
  return jnp.unpackbits(bits, axis=-1, count=shape[-1]).astype(bool)


def _apply_bits(a, bits):
  """z = a * m for every leaf (MaskedNode leaves pass through)."""
  return jax.tree.map(lambda x, b: x * unpack_mask(b, x.shape).astype(x.dtype), a, bits)


def auxiliary_and_dual(state: ADMMState) -> tuple[optax.Params, optax.Params]:
  """(z, u) of an ADMMState (MaskedNode leaves pass through)."""
  z = _apply_bits(state.a, state.keep_bits)
  return z, jax.tree.map(jnp.subtract, state.a, z)


def find_admm_state(opt_state) -> Optional[ADMMState]:
  """The ADMMState inside a full (chained, masked) optimizer state, found by type; None if
  there is none (GMP, IHT, magnitude, dense)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ADMMState))
           if isinstance(s, ADMMState)]
  if len(found) > 1:
    raise ValueError(f"expected at most one ADMMState in the optimizer state, found {len(found)}")
  return found[0] if found else None


def admm_variables(opt_state) -> tuple[optax.Params, optax.Params, optax.Params]:
  """(z, u, keep_mask) of SAFE/SAFE+/ADMM from a full optimizer state (as built by
  `make_optimizer`): trees shaped like the params, `optax.MaskedNode` at non-prunable leaves;
  keep_mask is boolean (z = keep_mask * (x + u) at the last dual update)."""
  state = find_admm_state(opt_state)
  if state is None:
    raise ValueError("the optimizer state holds no ADMM state (only --sparsifier safe, "
                     "safe_plus and admm have z and u)")
  z, u = auxiliary_and_dual(state)
  keep = jax.tree.map(lambda a, b: unpack_mask(b, a.shape), state.a, state.keep_bits)
  return z, u, keep


def _count_changed(old_bits, new_bits) -> jax.Array:
  flips = jax.tree.map(
      lambda o, n: jnp.sum(jax.lax.population_count(o ^ n), dtype=jnp.int32), old_bits, new_bits)
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
    # z0 = Proj(x0), u0 = 0: a = z0 with the mask m of |x0| (z = m a = z0, u = a - z = 0).
    # SAFE+ has no importance yet at t = 0, so its first projection ranks |x0| too (P = 1).
    bits = jax.tree.map(pack_mask, projection.masks(jax.tree.map(jnp.abs, params)))
    zero = jnp.zeros([], stat_dtype(params))
    state = ADMMState(count=jnp.zeros([], jnp.int32), a=_apply_bits(params, bits),
                      keep_bits=bits, mask_change=zero, dual_residual=zero, penalty=zero)
    if importance is None:
      return state
    return state._replace(importance_sum=importance_lib.init_sum(importance, params),
                          importance_count=zero)

  def dual_update(state, params):
    """(a, bits, mask_change, dual_residual, importance_sum, importance_count) after the update."""
    z_prev, u = auxiliary_and_dual(state)
    a = jax.tree.map(jnp.add, params, u)
    if importance is None:
      scores = jax.tree.map(jnp.abs, a)
    else:
      mean = jax.tree.map(lambda s: s / state.importance_count, state.importance_sum)
      scores = importance_lib.scores(a, mean)
    bits = jax.tree.map(pack_mask, projection.masks(scores))
    dtype = state.dual_residual.dtype
    diff = jax.tree.leaves(jax.tree.map(jnp.subtract, _apply_bits(a, bits), z_prev))
    size = sum(x.size for x in jax.tree.leaves(a))
    change = (_count_changed(state.keep_bits, bits) / size).astype(dtype)
    reset = jax.tree.map(jnp.zeros_like, (state.importance_sum, state.importance_count))
    return (a, bits, change, tree_norm(diff, dtype)) + reset

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("admm needs the current params: call update(grads, state, params)")
    if importance is not None:
      seen = importance_lib.observation(importance, params, updates, extra_args)
      state = state._replace(
          importance_sum=importance_lib.accumulate(state.importance_sum, seen),
          importance_count=state.importance_count + 1)

    due = (state.count > 0) & (state.count % dual_update_interval == 0)
    a, bits, change, residual, imp_sum, imp_count = jax.lax.cond(
        due, lambda: dual_update(state, params),
        lambda: (state.a, state.keep_bits, state.mask_change, state.dual_residual,
                 state.importance_sum, state.importance_count))
    lam = jnp.asarray(penalty_fn(state.count), state.penalty.dtype)
    new_state = ADMMState(count=state.count + 1, a=a, keep_bits=bits, mask_change=change,
                          dual_residual=residual, penalty=lam, importance_sum=imp_sum,
                          importance_count=imp_count)
    z, u = auxiliary_and_dual(new_state)
    updates = jax.tree.map(lambda g, x, z_, u_: g + (lam * (x - z_ + u_)).astype(g.dtype),
                           updates, params, z, u)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
