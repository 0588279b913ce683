"""Exact hard projection: boolean keep-masks dropping exactly floor(s * N) lowest scores.

`prune_mask` is the public entry point. Ties are broken deterministically: among equal scores
the one at the lower position (leaves in tree order, row-major inside a leaf) is kept.

Method (no sort, no gather): scores map to order-preserving uint32 keys; the k-th smallest key
of each group (all leaves for "global", one leaf each for "layerwise") is found by a radix-style
search, `_B` thresholds per round, each round one fused counting pass whose [groups, _B] counts
are summed across devices (a small all-reduce). Ties at the threshold are then split by a
second search over the global positions of the equal entries (only run when needed). With
sharded leaves this runs per shard inside `jax.shard_map`, so weights are never gathered.
"""

import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

SCOPES = ("global", "layerwise", "nm")
_B = 7  # thresholds per search round (counted in one fused pass); measured best on CPU
_SIGN = np.uint32(0x80000000)


def _is_passthrough(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _check_finite(leaves):
  """ValueError on NaN/inf outside jit; inside jit keys follow the float bit order (see `_keys`)."""
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      continue
    if not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError("prune_mask: scores must be finite (got NaN or inf)")


def _keys(x: jax.Array) -> jax.Array:
  """Order-preserving uint32 keys of float32 scores (-0.0 == +0.0).

  Inside jit non-finite scores are not checked: +inf ranks above every finite score and NaN
  (positive sign bit) above +inf, so they are kept first; negative NaN ranks below -inf.
  """
  x = x.astype(jnp.float32)
  b = lax.bitcast_convert_type(x, jnp.uint32)
  u = jnp.where(b >= _SIGN, ~b, b | _SIGN)
  return jnp.where(x == 0, _SIGN, u)


def _num_dropped(sparsity, n: int):
  if n >= 2**31:
    raise NotImplementedError(f"prune_mask: a group of {n} >= 2^31 scores")
  if isinstance(sparsity, (float, int)):
    return jnp.int32(int(np.floor(float(sparsity) * n)))
  # Traced: floor of the float32 product, so f32(0.9) * 1200 gives 1080 as intended; differs
  # from the exact float64 floor by at most n * 2^-24 (only matters for n > 2^24).
  return jnp.floor(jnp.asarray(sparsity, jnp.float32) * np.float32(n)).astype(jnp.int32)


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


class _Leaf:
  """Static layout of one leaf: its group, offset in the group, and its sharding."""

  def __init__(self, shape, group, offset, spec=None, mesh_shape=None):
    self.shape, self.group, self.offset = tuple(shape), group, offset
    ndim = len(self.shape)
    entries = tuple(spec or ()) + (None,) * (ndim - len(tuple(spec or ())))
    self.dim_axes = [() if a is None else (a,) if isinstance(a, str) else tuple(a)
                     for a in entries[:ndim]]
    self.mesh_shape = dict(mesh_shape or {})
    self.local_shape = tuple(d // math.prod(self.mesh_shape[a] for a in axes)
                             for d, axes in zip(self.shape, self.dim_axes))
    used = {a for axes in self.dim_axes for a in axes}
    self.replicated_axes = [a for a in self.mesh_shape if a not in used]

  def weight(self):
    """1 on the first replica along the axes this leaf is replicated over, else 0."""
    w = jnp.int32(1)
    for a in self.replicated_axes:
      w = w * (lax.axis_index(a) == 0).astype(jnp.int32)
    return w

  def positions(self):
    """uint32 position of each local entry in its group's order (leaf offset + row-major)."""
    pos = jnp.full(self.local_shape, np.uint32(self.offset), jnp.uint32)
    stride = 1
    for d in reversed(range(len(self.shape))):
      idx = lax.broadcasted_iota(jnp.uint32, self.local_shape, d)
      if self.dim_axes[d]:
        shard = jnp.uint32(0)
        for a in self.dim_axes[d]:
          shard = shard * np.uint32(self.mesh_shape[a]) + lax.axis_index(a).astype(jnp.uint32)
        idx = idx + shard * np.uint32(self.local_shape[d])
      pos = pos + idx * np.uint32(stride)
      stride *= self.shape[d]
    return pos


def _count(operands_fn, blocks, leaves, num_groups, reduce):
  """[groups, _B] counts: sum over all entries of `operands_fn(leaf_index, block)` (B bools)."""
  counts = [jnp.zeros((_B,), jnp.int32) for _ in range(num_groups)]
  for i, (x, leaf) in enumerate(zip(blocks, leaves)):
    # One variadic reduce over all dims: a single fused pass; no reshape, so GSPMD can
    # partition it (local partial sums, then a tiny cross-device combine).
    ops = tuple(jnp.where(c, 1, 0).astype(jnp.int32) for c in operands_fn(i, x))
    sums = lax.reduce(ops, (np.int32(0),) * _B,
                      lambda a, b: tuple(u + v for u, v in zip(a, b)), tuple(range(x.ndim)))
    counts[leaf.group] = counts[leaf.group] + jnp.stack(sums) * leaf.weight()
  return reduce(jnp.stack(counts))


def _search(count_fn, k, lo, hi, c_lo, c_hi):
  """Per group the largest t in [lo, hi] with count(< t) < k (uint32), by _B-way rounds.

  Invariant: count(< lo) = c_lo < k <= c_hi = count(< hi + 1). Groups with lo == hi are done.
  """
  j = jnp.arange(1, _B + 1, dtype=jnp.uint32)

  def body(carry):
    lo, hi, c_lo, c_hi = carry
    w = hi - lo
    step = w // np.uint32(_B + 1) + np.uint32(1)
    t = lo[:, None] + jnp.minimum(j[None, :] * step[:, None], w[:, None])
    cnt = count_fn(t)
    below = cnt < k[:, None]
    lo = jnp.maximum(lo, jnp.max(jnp.where(below, t, lo[:, None]), axis=1))
    c_lo = jnp.maximum(c_lo, jnp.max(jnp.where(below, cnt, c_lo[:, None]), axis=1))
    hi = jnp.minimum(hi, jnp.min(jnp.where(below, hi[:, None], t - np.uint32(1)), axis=1))
    c_hi = jnp.minimum(c_hi, jnp.min(jnp.where(below, c_hi[:, None], cnt), axis=1))
    return lo, hi, c_lo, c_hi

  return lax.while_loop(lambda c: jnp.any(c[0] < c[1]), body, (lo, hi, c_lo, c_hi))


def _select(blocks, leaves, k, sizes, reduce):
  """Local keep-masks of `blocks` (local shards) dropping k[g] entries per group g."""
  num_groups = len(sizes)
  n = jnp.asarray(sizes, jnp.int32)
  done = k <= 0
  zero = jnp.zeros((num_groups,), jnp.uint32)
  top = jnp.where(done, zero, np.uint32(0xFFFFFFFF))

  def count_keys(t):
    return _count(lambda i, x: [_keys(x) < t[leaves[i].group, b] for b in range(_B)],
                  blocks, leaves, num_groups, reduce)

  thr, _, c_lt, c_le = _search(count_keys, k, zero, top, jnp.zeros_like(n), n)
  drop_eq = k - c_lt  # entries equal to the threshold to drop, from the highest position
  keep_eq = c_le - c_lt - drop_eq
  need = (~done) & (keep_eq > 0)

  def count_pos(t):
    def ops(i, x):
      eq = _keys(x) == thr[leaves[i].group]
      pos = leaves[i].positions()
      return [eq & (pos < t[leaves[i].group, b]) for b in range(_B)]
    return _count(ops, blocks, leaves, num_groups, reduce)

  def pos_cut():
    hi = jnp.where(need, (n - 1).astype(jnp.uint32), zero)
    cut, _, c_below, _ = _search(count_pos, keep_eq + 1, zero, hi, jnp.zeros_like(n), c_le - c_lt)
    # keep_eq + 1 > count(pos < cut) holds with equality: positions below `cut` are kept
    return jnp.where(need, cut, zero)

  cut = lax.cond(jnp.any(need), pos_cut, lambda: zero)
  masks = []
  for x, leaf in zip(blocks, leaves):
    g = leaf.group
    u = _keys(x)
    keep = (u > thr[g]) | ((u == thr[g]) & (leaf.positions() < cut[g]))
    masks.append(keep | done[g])
  return masks


def _leaf_spec(x, shardings, i):
  """(mesh, PartitionSpec) of leaf i if known: given `shardings`, a concrete array, or explicit axes."""
  s = shardings[i] if shardings is not None else None
  if s is None and not isinstance(x, jax.core.Tracer) and isinstance(x, jax.Array):
    s = x.sharding
  if s is None and isinstance(x, jax.core.Tracer):
    try:
      s = jax.typeof(x).sharding
    except Exception:  # pylint: disable=broad-except
      s = None
  if isinstance(s, NamedSharding) and s.mesh.size > 1 and not s.mesh.empty:
    if isinstance(s.mesh, jax.sharding.AbstractMesh) and not any(s.spec):
      return None  # auto axes: sharding unknown inside jit
    return s.mesh, s.spec
  return None


def _common_mesh(arrays, shardings):
  """The mesh and per-leaf specs for a shard_map path, or (None, None)."""
  found = [_leaf_spec(x, shardings, i) for i, x in enumerate(arrays)]
  meshes = {f[0] for f in found if f is not None}
  if len(meshes) != 1:
    return None, None  # unsharded, or leaves on different meshes: plain jnp path
  mesh = meshes.pop()
  specs = []
  for x, f in zip(arrays, found):
    spec = f[1] if f is not None else P()
    leaf = _Leaf(x.shape, 0, 0, spec, mesh.shape)
    if any(d % math.prod(mesh.shape[a] for a in axes)
           for d, axes in zip(x.shape, leaf.dim_axes)):
      spec = P()  # uneven: let shard_map replicate this leaf
    specs.append(spec)
  return mesh, specs


def _masks(arrays, groups, ks, sizes, mesh, specs):
  """Keep-masks of all arrays; per shard inside shard_map when a mesh is given."""
  k = jnp.stack([jnp.asarray(v, jnp.int32) for v in ks])
  specs = None if specs is None else tuple(specs)
  return _masks_jit(list(arrays), k, tuple(groups), tuple(sizes), mesh, specs)


@jax.jit(static_argnums=(2, 3, 4, 5))
def _masks_jit(arrays, k, groups, sizes, mesh, specs):
  """Compiled once per layout (k is traced), also when called outside jit."""
  offsets, seen = [], {}
  for x, g in zip(arrays, groups):
    offsets.append(seen.get(g, 0))
    seen[g] = offsets[-1] + x.size
  if mesh is None:
    leaves = [_Leaf(x.shape, g, o) for x, g, o in zip(arrays, groups, offsets)]
    return _select(list(arrays), leaves, k, sizes, lambda c: c)
  leaves = [_Leaf(x.shape, g, o, s, mesh.shape) for x, g, o, s in zip(arrays, groups, offsets, specs)]
  axes = tuple(mesh.axis_names)

  def body(k, *blocks):
    return tuple(_select(list(blocks), leaves, k, sizes, lambda c: lax.psum(c, axes)))

  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), *specs), out_specs=tuple(specs),
                     check_vma=False)
  return list(fn(k, *arrays))


def prune_mask(scores: Any, sparsity: Union[float, Sequence[float], jax.Array],
               scope: str = "global", n_m: Optional[tuple[int, int]] = None,
               shardings: Any = None) -> Any:
  """Boolean keep-masks of a pytree of non-negative scores.

  Args:
    scores: pytree of arrays; `None` / `optax.MaskedNode` leaves pass through unchanged.
    sparsity: fraction in [0, 1) to drop (may be traced); for "layerwise" also a sequence
      with one fraction per array leaf. Ignored for "nm".
    scope: "global" (one threshold over all leaves), "layerwise" or "nm".
    n_m: (N, M) for scope "nm": keep N of every M along the input dimension.
    shardings: optional pytree (like `scores`) of `NamedSharding`s of the leaves. Needed inside
      jit when the mesh axes are Auto (leaves' shardings are not visible there); outside jit
      and with Explicit axes they are read from the leaves. With a mesh the work runs per
      shard in `jax.shard_map` (no gather); without, as plain jnp (one device, or GSPMD).
  """
  if scope not in SCOPES:
    raise ValueError(f"scope (--sp_scope) must be one of {SCOPES}, got {scope!r}")
  leaves, treedef = jax.tree.flatten(scores, is_leaf=_is_passthrough)
  keep_idx = [i for i, x in enumerate(leaves) if not _is_passthrough(x)]
  arrays = [leaves[i] if isinstance(leaves[i], jax.Array) else jnp.asarray(leaves[i])
            for i in keep_idx]
  _check_finite(arrays)
  sh = None
  if shardings is not None:
    sh_leaves = treedef.flatten_up_to(shardings)
    sh = [sh_leaves[i] for i in keep_idx]
  mesh, specs = _common_mesh(arrays, sh) if arrays else (None, None)
  if scope == "nm":
    if n_m is None:
      raise ValueError("scope 'nm' needs n_m=(N, M) (--nm N:M)")
    masks = []
    for i, x in enumerate(arrays):
      m = n_m[1]
      if mesh is not None and x.ndim >= 2 and (x.shape[-2] % m == 0):
        leaf = _Leaf(x.shape, 0, 0, specs[i], mesh.shape)
        if leaf.local_shape[-2] % m == 0:
          fn = jax.shard_map(lambda b: _nm_mask(b, *n_m), mesh=mesh, in_specs=specs[i],
                             out_specs=specs[i], check_vma=False)
          masks.append(fn(x))
          continue
      masks.append(_nm_mask(x, *n_m))
  elif not arrays:
    masks = []
  elif scope == "layerwise":
    per_leaf = (list(sparsity) if isinstance(sparsity, (list, tuple))
                else [sparsity] * len(arrays))
    if len(per_leaf) != len(arrays):
      raise ValueError(f"layerwise sparsity has {len(per_leaf)} entries for {len(arrays)} leaves")
    sizes = [x.size for x in arrays]
    ks = [_num_dropped(s, n) for s, n in zip(per_leaf, sizes)]
    masks = _masks(arrays, list(range(len(arrays))), ks, sizes, mesh, specs)
  else:
    if isinstance(sparsity, (list, tuple)):
      raise ValueError("a per-leaf sparsity sequence needs scope 'layerwise'")
    total = sum(x.size for x in arrays)
    masks = _masks(arrays, [0] * len(arrays), [_num_dropped(sparsity, total)], [total], mesh, specs)
  it = iter(masks)
  return jax.tree.unflatten(treedef, [x if _is_passthrough(x) else next(it) for x in leaves])
