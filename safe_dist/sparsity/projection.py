"""Exact hard projection: boolean keep-masks dropping exactly floor(s * N) lowest scores.

This is the simple (sort-based) form; `prune_mask` is the public entry point.
Ties are broken deterministically: among equal scores the one at the lower position
(leaves in tree order, row-major inside a leaf) is kept.
"""

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCOPES = ("global", "layerwise", "nm")


def _is_passthrough(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _check_finite(leaves):
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      continue  # inside jit: non-finite scores sort above +inf/-inf; documented, not checked
    if not bool(np.all(np.isfinite(np.asarray(x)))):
      raise ValueError("prune_mask: scores must be finite (got NaN or inf)")


def _num_dropped(sparsity, n: int):
  if isinstance(sparsity, (float, int)):
    return int(np.floor(float(sparsity) * n))
  return jnp.floor(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)


def _keep_flat(flat: jax.Array, num_drop) -> jax.Array:
  """Keep-mask of a 1-d vector dropping the `num_drop` smallest (ties: higher index first)."""
  n = flat.shape[0]
  # Stable sort of the reversed vector orders equal scores by descending original position.
  order = jnp.argsort(flat[::-1], stable=True)
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))[::-1]
  return rank >= num_drop


def _nm_mask(x: jax.Array, n: int, m: int) -> jax.Array:
  """Keep the n largest of every m consecutive entries along the input axis (-2)."""
  if x.shape[-2] % m:
    raise ValueError(f"--nm {n}:{m}: input dimension {x.shape[-2]} of a kernel of shape "
                     f"{x.shape} is not divisible by M={m}")
  moved = jnp.moveaxis(x, -2, -1)
  groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
  # rank within group: number of entries that beat it (larger, or equal at a lower index)
  a = groups[..., :, None]
  b = groups[..., None, :]
  idx = jnp.arange(m)
  beats = (b > a) | ((b == a) & (idx[None, :] < idx[:, None]))
  keep = jnp.sum(beats, axis=-1) < n
  return jnp.moveaxis(keep.reshape(moved.shape), -1, -2)


def prune_mask(scores: Any, sparsity: Union[float, Sequence[float], jax.Array],
               scope: str = "global", n_m: Optional[tuple[int, int]] = None) -> Any:
  """Boolean keep-masks of a pytree of non-negative scores.

  Args:
    scores: pytree of arrays; `None` / `optax.MaskedNode` leaves pass through unchanged.
    sparsity: fraction in [0, 1) to drop (may be traced); for "layerwise" also a sequence
      with one fraction per array leaf. Ignored for "nm".
    scope: "global" (one threshold over all leaves), "layerwise" or "nm".
    n_m: (N, M) for scope "nm": keep N of every M along the input dimension.
  """
  if scope not in SCOPES:
    raise ValueError(f"scope (--sp_scope) must be one of {SCOPES}, got {scope!r}")
  leaves, treedef = jax.tree.flatten(scores, is_leaf=_is_passthrough)
  arrays = [x for x in leaves if not _is_passthrough(x)]
  _check_finite(arrays)
  if scope == "nm":
    if n_m is None:
      raise ValueError("scope 'nm' needs n_m=(N, M) (--nm N:M)")
    masks = [_nm_mask(jnp.asarray(x), *n_m) for x in arrays]
  elif scope == "layerwise":
    per_leaf = (list(sparsity) if isinstance(sparsity, (list, tuple))
                else [sparsity] * len(arrays))
    if len(per_leaf) != len(arrays):
      raise ValueError(f"layerwise sparsity has {len(per_leaf)} entries for {len(arrays)} leaves")
    masks = [_keep_flat(jnp.ravel(x), _num_dropped(s, x.size)).reshape(x.shape)
             for x, s in zip(arrays, per_leaf)]
  else:
    if isinstance(sparsity, (list, tuple)):
      raise ValueError("a per-leaf sparsity sequence needs scope 'layerwise'")
    if arrays:
      flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in arrays])
      keep = _keep_flat(flat, _num_dropped(sparsity, flat.size))
      offsets = np.cumsum([0] + [x.size for x in arrays])
      masks = [keep[a:b].reshape(x.shape) for x, a, b in zip(arrays, offsets[:-1], offsets[1:])]
    else:
      masks = []
  it = iter(masks)
  return jax.tree.unflatten(treedef, [x if _is_passthrough(x) else next(it) for x in leaves])
