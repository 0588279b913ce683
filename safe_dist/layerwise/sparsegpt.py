"""SparseGPT (Frantar & Alistarh, 2023) on one linear kernel, as the official code runs it.

Our kernels are (in, out) with y = x @ w, so the reference's columns (inputs) are our rows.
Inputs are pruned in order, in blocks of `block_size` rows. Inside a block, one row at a time
(optimal brain surgeon): the row is masked and its error is spread over the block's later rows
through U, the upper Cholesky factor of H^-1. At the block's end the error goes to all later
rows at once (the lazy update). Each step works per output column, so with w sharded over its
outputs only the mask selection talks across devices, and `prune_mask` runs it per shard.

Changes from the reference: each block drops exactly floor(sparsity * rows * out) weights (the
reference thresholds a sort and keeps ties; `prune_mask` keeps the lower position among equal
scores, ranked at float32 precision); U comes from one Cholesky factorization and one
triangular solve instead of three factorizations (the same matrix, up to rounding).
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from safe_dist.sparsity.topk import prune_mask


@jax.jit
def inverse_hessian_factor(hessian: jax.Array, damp=0.01) -> tuple[jax.Array, jax.Array]:
  """(dead inputs, U): U is the upper Cholesky factor of (H + damping)^-1, so H^-1 = U^T U.

  Dead inputs (H_jj = 0) get H_jj = 1; then damp * mean(diag H) is added to the diagonal.
  Kernels reading the same inputs (q, k, v; gate, up) can share it. In float32 at least.
  """
  n = hessian.shape[0]
  hessian = hessian.astype(jnp.promote_types(hessian.dtype, jnp.float32))
  dead = jnp.diagonal(hessian) == 0
  h = hessian + jnp.diag(dead.astype(hessian.dtype))
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(n, dtype=h.dtype)
  # H = R R^T with R upper: R is the Cholesky factor of H with the inputs in reverse order.
  # Then H^-1 = R^-T R^-1, so U = R^-1: one factorization and one triangular solve, without
  # forming H^-1 (the reference factors H, inverts it, then factors H^-1 again).
  low = jnp.linalg.cholesky(h[::-1, ::-1])
  u = lax.linalg.triangular_solve(low, jnp.eye(n, dtype=h.dtype), left_side=True, lower=True)
  return dead, u[::-1, ::-1]


def _prune_block(w, u, choose, group):
  """Prunes the rows of one block in order; returns (pruned rows, keep-mask, scaled errors).

  w: (rows, out) current weights; u: (rows, rows), U's diagonal block. At the start of every
  `group` rows (the block, or M rows for N:M), `choose(scores)` gives their keep-mask from the
  current weights, scores w^2 / U_jj^2.
  """
  d = jnp.diagonal(u)

  def row(i, carry):
    w, keep, err = carry
    q = jnp.where(keep[i], w[i], 0)
    e = (w[i] - q) / d[i]
    # U is upper triangular: rows before i get exact zeros, row i lands at q (set exactly)
    w = (w - u[i][:, None] * e[None, :]).at[i].set(q)
    return w, keep, err.at[i].set(e)

  def group_step(g, carry):
    w, keep, err = carry
    start = g * group
    rows = lax.dynamic_slice_in_dim(w, start, group)
    d_rows = lax.dynamic_slice_in_dim(d, start, group)
    keep = lax.dynamic_update_slice_in_dim(keep, choose(rows**2 / d_rows[:, None]**2), start, 0)
    return lax.fori_loop(start, start + group, row, (w, keep, err))

  init = (w, jnp.ones(w.shape, bool), jnp.zeros_like(w))
  return lax.fori_loop(0, w.shape[0] // group, group_step, init)


def _rows_unsharded(sharding: Optional[NamedSharding]) -> Optional[NamedSharding]:
  """`sharding` with the input dimension replicated: the row loop needs every row locally."""
  if sharding is None:
    return None
  spec = tuple(sharding.spec) + (None, None)
  return NamedSharding(sharding.mesh, P(None, spec[1]))


def sparsegpt(w: jax.Array, hessian: jax.Array, sparsity, n_m: Optional[tuple[int, int]] = None,
              block_size: int = 128, damp=0.01,
              sharding: Optional[NamedSharding] = None) -> tuple[jax.Array, jax.Array]:
  """SparseGPT of one kernel w (in, out) given its inputs' Hessian H (in, in) = 2/n sum x x^T.

  Args:
    sparsity: fraction dropped in each block of rows (may be traced); ignored with `n_m`.
    n_m: (N, M): keep N of every M consecutive inputs per output, chosen at every M-th row
      from the current weights; `in` and `block_size` must be multiples of M.
    block_size: rows per block; the last block is shorter when it does not divide `in`.
    damp: damping, as a fraction of the mean diagonal of H.
    sharding: optional `NamedSharding` of w, output dimension over mesh axes (an input-axis
      entry is dropped: w is laid out with whole columns per device). Lets the mask selection
      run per shard inside jit.
  Returns:
    (pruned w, keep-mask): w's dtype, computed in float32 at least. Weights of dead inputs
    (H_jj = 0) are 0 whatever the mask says.
  """
  dead, u = inverse_hessian_factor(hessian, damp)
  return sparsegpt_from_factor(w, dead, u, sparsity, n_m=n_m, block_size=block_size,
                               sharding=sharding)


@jax.jit(static_argnames=("n_m", "block_size", "sharding"))
def sparsegpt_from_factor(w: jax.Array, dead: jax.Array, u: jax.Array, sparsity,
                          n_m: Optional[tuple[int, int]] = None, block_size: int = 128,
                          sharding: Optional[NamedSharding] = None
                          ) -> tuple[jax.Array, jax.Array]:
  """`sparsegpt` given `inverse_hessian_factor(H)` as (dead, u)."""
  dtype, n_in = w.dtype, w.shape[0]
  w = w.astype(jnp.result_type(w, u))
  block_size = min(block_size, n_in)
  layout = _rows_unsharded(sharding)
  constrain = (lambda x: x) if layout is None else (
      lambda x: lax.with_sharding_constraint(x, layout))
  w = constrain(jnp.where(dead[:, None], 0, w))
  if n_m is None:
    group = None  # the whole block
    choose = lambda s: prune_mask(s, sparsity, shardings=layout)
  else:
    group = n_m[1]
    if n_in % group or block_size % group:
      raise ValueError(f"sparsegpt {n_m[0]}:{group}: in ({n_in}) and block_size ({block_size}) "
                       f"must be multiples of M")
    choose = lambda s: prune_mask(s, None, n_m=n_m, shardings=layout)

  def block(w, start, size):
    """Prunes rows [start, start + size) of w and pushes their error onto all later rows."""
    u_rows = lax.dynamic_slice_in_dim(u, start, size)
    q, keep, err = _prune_block(lax.dynamic_slice_in_dim(w, start, size),
                                lax.dynamic_slice_in_dim(u_rows, start, size, axis=1),
                                choose, group or size)
    w = lax.dynamic_update_slice_in_dim(w, q, start, 0)
    # lazy update, full width (static shapes in the scan): U's columns up to the block's end
    # are zeroed. HIGHEST: no TF32 / bf16 passes on accelerators (the reference disables TF32)
    later = jnp.where(jnp.arange(n_in) >= start + size, u_rows, 0)
    w = w - jnp.matmul(later.T, err, precision=lax.Precision.HIGHEST)
    return constrain(w), keep

  num_full = n_in // block_size
  w, keeps = lax.scan(lambda w, b: block(w, b * block_size, block_size), w,
                      jnp.arange(num_full))
  keep = keeps.reshape(num_full * block_size, -1)
  if n_in % block_size:  # the shorter last block, outside the scan (its own static shape)
    w, tail = block(w, num_full * block_size, n_in % block_size)
    keep = jnp.concatenate([keep, tail])
  return w.astype(dtype), keep
