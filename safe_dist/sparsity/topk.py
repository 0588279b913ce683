"""Exact hard projection: boolean keep-masks dropping exactly floor(s * N) lowest scores.

`prune_mask` is the public entry point. Ties are broken deterministically: among equal scores
the one at the lower position (leaves in tree order, row-major inside a leaf) is kept.

Method (no sort, no gather): scores map to order-preserving uint32 keys; the k-th smallest key
of each group (all leaves for "global", one leaf each for "layerwise") is found by a selection
search, `_B` thresholds per round, each round one fused counting pass (counts below each
threshold plus min/max inside the bracket) whose small per-device results are combined across
devices (a tiny all-gather). Sharded: the first round's thresholds come from a fixed-size
strided key sample (all-gathered and sorted: its size does not grow with N); later rounds
interpolate the rank inside the bracket (Floyd-Rivest style), falling back to equal key-space
splits. Ties at the threshold are then split over the global positions of the equal entries
(only when needed; usually one pass). With sharded leaves this runs per shard inside
`jax.shard_map`, so weights are never gathered. Exactness never depends on the heuristics:
every bracket update uses exact counts.

Where concatenating moves no data (local shards inside shard_map, or leaves on one device), a
group's small leaves (<= _JOIN_MAX local entries) are scanned as one flat vector of keys
(`_segments`): the counting passes per round do not grow with their number, so a model's
dozens of small kernels compile as a few (at the cost of one uint32 key per joined entry held
during the search); larger leaves keep one fused pass each.
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
_B = 7  # thresholds per search round (one fused pass of _B + 2 operands); measured on CPU
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

  Wider scores (float64 under jax_enable_x64) are ranked at float32 precision: scores equal
  after rounding to float32 are ties (the lower position is kept); the count stays exact.

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
  # Traced: floor of the product in the sparsity's float type, at least float32 (float64 under
  # jax_enable_x64), so f32(0.9) * 1200 gives 1080 as intended; in float32 it differs from the
  # exact float64 floor by at most n * 2^-24 (only matters for n > 2^24).
  dtype = jnp.promote_types(jnp.result_type(sparsity), jnp.float32)
  return jnp.floor(jnp.asarray(sparsity, dtype) * jnp.asarray(n, dtype)).astype(jnp.int32)


def resolve_scope(scope: Optional[str], n_m: Optional[tuple[int, int]]) -> str:
  """The scope to use: `scope`, or when it is None "nm" if `n_m` is given, else "global".

  The one check of --sp_scope and --nm: an N:M pattern with another explicit scope is an error
  (it would silently prune unstructured).
  """
  if scope is None:
    scope = "global" if n_m is None else "nm"
  if scope not in SCOPES:
    raise ValueError(f"scope (--sp_scope) must be one of {SCOPES}, got {scope!r}")
  if scope != "nm":
    if n_m is not None:
      raise ValueError(f"n_m (--nm) {n_m} needs scope 'nm' (--sp_scope nm), got {scope!r}")
    return scope
  if n_m is None:
    raise ValueError("scope 'nm' (--sp_scope nm) needs n_m=(N, M) (--nm N:M, e.g. 2:4)")
  n, m = n_m
  if not 0 < n < m:
    raise ValueError(f"--nm must be N:M with 0 < N < M, got {n}:{m}")
  return scope


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


_JOIN_MAX = 2**16  # local entries: larger leaves are scanned alone (joined, they ran 2-4x
# slower on CPU than a fused per-leaf pass), smaller ones are joined; their count is what grows
_PIECES = 4  # a joined segment is scanned in up to this many pieces: XLA:CPU runs them
_MIN_PIECE = 2**16  # concurrently (one reduce over all of it ran 2x slower on 2 cores)


def _flat(parts):
  return parts[0].reshape(-1) if len(parts) == 1 else jnp.concatenate(
      [p.reshape(-1) for p in parts])


class _Segment:
  """Local entries the counting passes scan as one operand: one leaf (any shape), or a span of
  the flattened leaves of a group with the same replication, concatenated in tree order.

  Flattening makes the number of passes per round (and of compiled kernels) independent of the
  number of leaves; it is only used where concatenating cannot move data between devices
  (local shards inside shard_map, or a single device). It holds one uint32 key per entry.
  """

  def __init__(self, blocks, leaves, joined_keys=None, span=None):
    self.blocks, self.leaves = blocks, leaves
    self.group, self.replicated_axes = leaves[0].group, leaves[0].replicated_axes
    # The group's keys, concatenated once outside the search loops (None: a single unflattened
    # leaf, whose keys are computed inside each pass, fused).
    self._joined_keys = joined_keys
    self.start, self.stop = span or (0, sum(x.size for x in blocks))
    self.size = self.stop - self.start

  def keys(self):
    if self._joined_keys is None:
      return _keys(self.blocks[0])
    return self._joined_keys[self.start:self.stop]

  def positions(self):
    if self._joined_keys is None:
      return self.leaves[0].positions()
    first = self.leaves[0]
    if all(not any(leaf.dim_axes) for leaf in self.leaves) and all(
        b.offset == a.offset + math.prod(a.shape) for a, b in zip(self.leaves, self.leaves[1:])):
      # whole leaves, consecutive in the group: one iota (one kernel instead of one per leaf)
      return np.uint32(first.offset + self.start) + lax.iota(jnp.uint32, self.size)
    return _flat([leaf.positions() for leaf in self.leaves])[self.start:self.stop]

  def weight(self):
    return self.leaves[0].weight()


def _segments(blocks, leaves, flatten: bool) -> list:
  """One segment per leaf; or with `flatten`, per (group, replication) the keys of the leaves
  of at most _JOIN_MAX local entries concatenated and cut into up to _PIECES spans (larger
  leaves stay one segment each)."""
  if not flatten:
    return [_Segment([x], [leaf]) for x, leaf in zip(blocks, leaves)]
  members, segments = {}, []
  for x, leaf in zip(blocks, leaves):
    if x.size > _JOIN_MAX:
      segments.append(_Segment([x], [leaf]))
    elif x.size:
      members.setdefault((leaf.group, tuple(leaf.replicated_axes)), []).append((x, leaf))
  for m in members.values():
    blocks_g, leaves_g = [x for x, _ in m], [leaf for _, leaf in m]
    joined = _keys(_flat(blocks_g))
    pieces = max(1, min(_PIECES, joined.size // _MIN_PIECE))
    cuts = [joined.size * i // pieces for i in range(pieces + 1)]
    segments += [_Segment(blocks_g, leaves_g, joined, span) for span in zip(cuts, cuts[1:])]
  return segments


_UMAX = np.uint32(0xFFFFFFFF)
_SAMPLE = 512  # per device and group: sampled keys for the first (rank-based) thresholds
_SPREAD = 0.3  # interpolation: rank standard deviation ~ _SPREAD * sqrt(bracket count)
_CURVE = 0.001  # ... plus _CURVE * count: the density is not flat across wide brackets
_INTERP_WIDTH = 2**22  # key-space brackets narrower than this are split by interpolation
_SHRINK = 2  # an interpolation round that shrinks the count less is followed by a uniform one


def _count(operands_fn, segments, num_groups, t, lo, hi, reduce):
  """Counts [groups, _B] of entries with value < t[g, b], and min/max value in [lo, hi],
  each combined over devices by `reduce(counts, mins, maxs)`.

  `operands_fn(segment)` gives (values uint32, eligible bool or None). One variadic reduce per
  segment over all dims: a single fused pass (a leaf is not reshaped, so GSPMD can partition it).
  Plain sum/min/max combiners only: a combiner with selects (e.g. min and how many reach it)
  is ~4x slower on CPU.
  """
  counts = [jnp.zeros((_B,), jnp.int32) for _ in range(num_groups)]
  mins = [jnp.full((), _UMAX) for _ in range(num_groups)]
  maxs = [jnp.zeros((), jnp.uint32) for _ in range(num_groups)]

  def red(a, b):
    return tuple(u + v for u, v in zip(a[:_B], b[:_B])) + (
        jnp.minimum(a[_B], b[_B]), jnp.maximum(a[_B + 1], b[_B + 1]))

  for seg in segments:
    g = seg.group
    v, ok = operands_fn(seg)
    inb = (v >= lo[g]) & (v <= hi[g])
    lt = [v < t[g, b] for b in range(_B)]
    if ok is not None:
      inb = inb & ok
      lt = [ok & c for c in lt]
    if seg.replicated_axes:  # min/max only over the counted (first) replica
      inb = inb & (seg.weight() > 0)
    ops = tuple(jnp.where(c, 1, 0).astype(jnp.int32) for c in lt) + (
        jnp.where(inb, v, _UMAX), jnp.where(inb, v, np.uint32(0)))
    out = lax.reduce(ops, (np.int32(0),) * _B + (_UMAX, np.uint32(0)), red,
                     tuple(range(v.ndim)))
    counts[g] = counts[g] + jnp.stack(out[:_B]) * seg.weight()
    mins[g] = jnp.minimum(mins[g], out[_B])
    maxs[g] = jnp.maximum(maxs[g], out[_B + 1])
  return reduce(jnp.stack(counts), jnp.stack(mins), jnp.stack(maxs))


# Interpolation thresholds: offsets in standard deviations of the bracket rank estimate.
_OFFSETS = {5: (-2.5, -0.8, 0.0, 0.8, 2.5), 7: (-3.0, -1.5, -0.5, 0.0, 0.5, 1.5, 3.0)}


def _search(count_fn, k, lo, hi, c_lo, c_hi, first=None, interp_width=_INTERP_WIDTH,
            stop_at_hi=True):
  """Per group the largest t in [lo, hi] with count(< t) < k (uint32): k-th smallest value.

  Invariant: count(< lo) = c_lo < k <= c_hi = count(< hi + 1), so the bracket holds the answer.
  A group is done when lo == hi, or early: with `stop_at_hi` when c_hi == k (then dropping
  every value <= hi drops exactly k; returned as lo = hi, c_lo not meaningful), else when
  c_lo == k - 1 (values < lo are exactly k - 1; lo returned).

  Every round is one counting pass at _B ascending thresholds; whatever the thresholds are,
  the exact counts keep the invariant, so their choice only affects speed: `first`
  ([groups, _B], e.g. from a sample) in round one; then, while the key-space width is in
  (_B, interp_width) and the last interpolation round shrank the count _SHRINK-fold,
  thresholds around the linearly interpolated position of rank k (spread ~ sqrt(count) plus
  a term for curvature); else _B + 1 equal key-space parts (every key when the width is <= _B).
  The same pass gives the min/max value inside the bracket, which snaps it to values that
  exist (a bracket of equal values ends at once; two distinct values as well).
  """
  j = jnp.arange(1, _B + 1, dtype=jnp.uint32)
  offs = jnp.asarray(_OFFSETS[_B], jnp.float32)

  def thresholds(lo, hi, c_lo, c_hi, ok, nb):
    w = hi - lo
    step = w // np.uint32(_B + 1) + np.uint32(1)
    uni = lo[:, None] + jnp.minimum(j[None, :] * step[:, None], w[:, None])
    cnt = jnp.maximum(c_hi - c_lo, 1).astype(jnp.float32)
    # aim at the gap that ends the search early (count(< t) == k, or k - 1)
    r = (k - c_lo).astype(jnp.float32) - (0.0 if stop_at_hi else 1.0)
    wf = w.astype(jnp.float32) + 1.0
    sd = _SPREAD * jnp.sqrt(cnt) + _CURVE * cnt + 1.0
    # density linear in the key: slope from the exact counts just outside the bracket
    tl, cl, tr, cr = nb
    rho = cnt / wf
    dl, dr = (lo - tl).astype(jnp.float32), (tr - hi).astype(jnp.float32)
    rho_l = jnp.where(dl > 0, (c_lo - cl).astype(jnp.float32) / jnp.maximum(dl, 1.0), rho)
    rho_r = jnp.where(dr > 0, (cr - c_hi).astype(jnp.float32) / jnp.maximum(dr, 1.0), rho)
    slope = (rho_r - rho_l) / (0.5 * dl + wf + 0.5 * dr)
    lim = 1.8 * rho / wf  # keep the density > 0.1 rho across the bracket
    slope = jnp.clip(slope, -lim, lim)
    a, b = 0.5 * slope, rho - 0.5 * slope * wf  # count(< lo + x) - c_lo ~ a x^2 + b x
    ro = jnp.clip(r[:, None] + offs[None, :] * sd[:, None], 0.0, cnt[:, None])
    pos = 2.0 * ro / (b[:, None] + jnp.sqrt(jnp.maximum(b[:, None]**2 + 4.0 * a[:, None] * ro,
                                                        0.0)))
    pos = jnp.clip(jnp.round(pos), 1.0, jnp.minimum(w.astype(jnp.float32), 4.29e9)[:, None])
    itp = lo[:, None] + jnp.minimum(pos.astype(jnp.uint32), w[:, None])
    # (a bracket of <= _B + 1 keys is split at every key: exact in one round)
    use = ok & (w < np.uint32(interp_width)) & (w > np.uint32(_B))
    return jnp.where(use[:, None], itp, uni), use

  def body(carry):
    lo, hi, c_lo, c_hi, ok, rnd, nb = carry
    t, use = thresholds(lo, hi, c_lo, c_hi, ok, nb)
    if first is not None:
      t = jnp.where(rnd == 0, first, t)
      use = use | (rnd == 0)
    cnt, mn, mx = count_fn(t, lo, hi)
    active = ~stopped(lo, hi, c_lo, c_hi)
    below = cnt < k[:, None]
    n_lo = jnp.maximum(lo, jnp.max(jnp.where(below, t, lo[:, None]), axis=1))
    n_clo = jnp.maximum(c_lo, jnp.max(jnp.where(below, cnt, c_lo[:, None]), axis=1))
    n_hi = jnp.minimum(hi, jnp.min(jnp.where(below, hi[:, None], t - np.uint32(1)), axis=1))
    n_chi = jnp.minimum(c_hi, jnp.min(jnp.where(below, c_hi[:, None], cnt), axis=1))
    # values exist in [mn, mx] only: no entry in [lo, mn) or (mx, hi], counts unchanged
    n_lo = jnp.where(active, jnp.maximum(n_lo, mn), lo)
    n_hi = jnp.where(active, jnp.minimum(n_hi, mx), hi)
    # two distinct entries in the bracket: the answer is one of them, each counted once
    two = active & (c_hi - c_lo == 2) & (mn < mx)
    first_one = k - c_lo == 1
    n_lo = jnp.where(two, jnp.where(first_one, mn, mx), n_lo)
    n_hi = jnp.where(two, jnp.where(first_one, mn, mx), n_hi)
    n_clo = jnp.where(two, jnp.where(first_one, c_lo, c_lo + 1), n_clo)
    n_chi = jnp.where(two, jnp.where(first_one, c_lo + 1, c_hi), n_chi)
    keep = lambda new, old: jnp.where(active, new, old)
    n_lo, n_hi, n_clo, n_chi = keep(n_lo, lo), keep(n_hi, hi), keep(n_clo, c_lo), keep(n_chi, c_hi)
    shrunk = (n_chi - n_clo) * _SHRINK <= (c_hi - c_lo)
    ok = jnp.where(use, shrunk, True)
    # nearest thresholds outside the new bracket (with their counts), for the density slope
    nbl = jnp.sum(below, axis=1, dtype=jnp.int32)
    at = lambda a, i: jnp.take_along_axis(a, jnp.clip(i, 0, _B - 1)[:, None], 1)[:, 0]
    tl, cl, tr, cr = nb
    tl = jnp.where(nbl >= 2, at(t, nbl - 2), jnp.where(nbl == 1, lo, tl))
    cl = jnp.where(nbl >= 2, at(cnt, nbl - 2), jnp.where(nbl == 1, c_lo, cl))
    tr = jnp.where(nbl <= _B - 2, at(t, nbl + 1) - np.uint32(1), jnp.where(nbl == _B - 1, hi, tr))
    cr = jnp.where(nbl <= _B - 2, at(cnt, nbl + 1), jnp.where(nbl == _B - 1, c_hi, cr))
    nb = tuple(keep(a, b) for a, b in zip((tl, cl, tr, cr), nb))
    return n_lo, n_hi, n_clo, n_chi, ok, rnd + 1, nb

  def stopped(lo, hi, c_lo, c_hi):
    return (lo >= hi) | ((c_hi == k) if stop_at_hi else (c_lo == k - 1))

  ok0 = jnp.ones(lo.shape, bool)
  lo, hi, c_lo, c_hi, _, _, _ = lax.while_loop(
      lambda c: ~jnp.all(stopped(*c[:4])), body,
      (lo, hi, c_lo, c_hi, ok0, jnp.int32(0), (lo, c_lo, hi, c_hi)))
  if stop_at_hi:
    lo = jnp.where(c_hi == k, hi, lo)
  return lo, hi, c_lo, c_hi


def _sample_thresholds(segments, k, sizes, gather):
  """[groups, _B] first-round key thresholds from a strided sample of every local segment.

  Each device takes ~_SAMPLE keys per group, strided over its local segments in proportion to
  their sizes (so every sample point stands for about the same number of entries; replicas
  other than the first one of a replicated leaf are masked out); `gather` collects them from
  all devices (fixed size, independent of N). One single-operand sort (fast on CPU, unlike a
  keyed sort), then the thresholds are sample keys around the rank k (spread ~ sqrt(sample)).
  """
  num_groups = len(sizes)
  local = [0] * num_groups
  for seg in segments:
    local[seg.group] += seg.size
  per_group = [[] for _ in range(num_groups)]
  for seg in segments:
    g = seg.group
    if seg.size == 0:
      continue
    m = max(1, min(seg.size, round(_SAMPLE * seg.size / local[g])))
    keys = seg.keys().reshape(-1)[::seg.size // m][:m]
    if seg.replicated_axes:
      keys = jnp.where(seg.weight() > 0, keys, _UMAX)
    per_group[g].append(keys)
  # a static width, the same for any N >= _SAMPLE per device: each of a group's segments takes
  # at most one key more than its rounded share
  width = max(min(local[g], _SAMPLE) + len(p) for g, p in enumerate(per_group))
  ks = []
  for p in per_group:
    kk = jnp.concatenate(p) if p else jnp.zeros((0,), jnp.uint32)
    ks.append(jnp.concatenate([kk, jnp.full((width - kk.size,), _UMAX)]))
  skeys, valid = gather(jnp.stack(ks))  # [groups, devices * width], [groups]
  skeys = jnp.sort(skeys, axis=1)
  valid = valid.astype(jnp.float32)
  q = jnp.clip(k.astype(jnp.float32) / jnp.asarray(sizes, jnp.float32), 0.0, 1.0)
  sd = jnp.sqrt(valid * q * (1 - q)) + 1.0
  idx = (q * valid)[:, None] + jnp.asarray(_OFFSETS[_B], jnp.float32)[None, :] * sd[:, None]
  idx = jnp.clip(jnp.floor(idx), 0, jnp.maximum(valid - 1, 0)[:, None]).astype(jnp.int32)
  return jnp.take_along_axis(skeys, idx, axis=1)


def _combine(c, mn, mx):
  """Per-device stats ([devices, groups, ...]) -> totals, min, max."""
  return jnp.sum(c, axis=0, dtype=jnp.int32), jnp.min(mn, axis=0), jnp.max(mx, axis=0)


def _select(blocks, leaves, k, sizes, collect, gather=None, flatten=False):
  """Local keep-masks of `blocks` (local shards) dropping k[g] entries per group g.

  `collect(counts, mins, maxs)` gives every device's local stats ([devices, ...]); `gather`
  (optional) every device's key sample; `flatten`: scan the blocks as `_segments`.
  """
  segments = _segments(blocks, leaves, flatten)
  reduce = lambda *stats: _combine(*collect(*stats))
  num_groups = len(sizes)
  n = jnp.asarray(sizes, jnp.int32)
  done = k <= 0
  zero = jnp.zeros((num_groups,), jnp.uint32)
  top = jnp.where(done, zero, _UMAX)

  def count_keys(t, lo, hi):
    return _count(lambda seg: (seg.keys(), None), segments, num_groups, t, lo, hi, reduce)

  first = None if gather is None else _sample_thresholds(segments, k, sizes, gather)
  thr, _, c_lt, c_le = _search(count_keys, k, zero, top, jnp.zeros_like(n), n, first=first)
  drop_eq = k - c_lt  # entries equal to the threshold to drop, from the highest position
  keep_eq = c_le - c_lt - drop_eq
  need = (~done) & (keep_eq > 0)

  def count_pos(t, lo, hi):
    return _count(lambda seg: (seg.positions(), seg.keys() == thr[seg.group]), segments,
                  num_groups, t, lo, hi, reduce)

  def tied_stats():
    """Every device's count, min and max position of its entries equal to the threshold."""
    c = [jnp.int32(0)] * num_groups
    mn = [jnp.full((), _UMAX)] * num_groups
    mx = [jnp.zeros((), jnp.uint32)] * num_groups
    for seg in segments:
      g = seg.group
      eq = seg.keys() == thr[g]
      if seg.replicated_axes:
        eq = eq & (seg.weight() > 0)
      pos = seg.positions()
      out = lax.reduce((eq.astype(jnp.int32), jnp.where(eq, pos, _UMAX), jnp.where(eq, pos, 0)),
                       (np.int32(0), _UMAX, np.uint32(0)),
                       lambda a, b: (a[0] + b[0], jnp.minimum(a[1], b[1]),
                                     jnp.maximum(a[2], b[2])), tuple(range(eq.ndim)))
      c[g], mn[g], mx[g] = c[g] + out[0], jnp.minimum(mn[g], out[1]), jnp.maximum(mx[g], out[2])
    c = jnp.broadcast_to(jnp.stack(c)[:, None], (num_groups, _B))
    lc, lmn, lmx = collect(c, jnp.stack(mn), jnp.stack(mx))
    return lc[..., 0], lmn, lmx

  def pos_cut():
    # The cut is the position of the (keep_eq + 1)-th tied entry. First pass: every device's
    # count, min and max position of its tied entries; when no device has more than two,
    # these are all the tied positions (the usual case: few ties). Else (or for the other
    # groups) a search inside [min, max].
    r = keep_eq + 1
    hi = jnp.where(need, (n - 1).astype(jnp.uint32), zero)
    lc, lmn, lmx = tied_stats()  # [devices, groups]
    cands = jnp.concatenate([jnp.where(lc >= 1, lmn, _UMAX), jnp.where(lc == 2, lmx, _UMAX)])
    cands = jnp.sort(cands, axis=0)  # [2 * devices, groups]
    found = jnp.take_along_axis(cands, jnp.clip(r - 1, 0, cands.shape[0] - 1)[None], 0)[0]
    small = need & jnp.all(lc <= 2, axis=0)
    lo = jnp.where(small, found, jnp.where(need, jnp.min(lmn, axis=0), zero))
    hi = jnp.where(small, found, jnp.where(need, jnp.max(lmx, axis=0), zero))
    # (own cond: XLA hoists the loop-invariant positions out of the search loop and would
    # materialize them even when the loop runs zero rounds)
    search = lambda: _search(count_pos, r, lo, hi, jnp.zeros_like(n), c_le - c_lt,
                             interp_width=2**32 - 1, stop_at_hi=False)[0]
    cut = lax.cond(jnp.any(lo < hi), search, lambda: lo)
    # r > count(pos < cut) holds with equality: tied entries below `cut` are kept
    return jnp.where(need, cut, zero)

  cut = lax.cond(jnp.any(need), pos_cut, lambda: zero)
  masks = []
  for x, leaf in zip(blocks, leaves):
    g = leaf.group
    u = _keys(x)
    keep = (u > thr[g]) | ((u == thr[g]) & (leaf.positions() < cut[g]))
    masks.append(keep | done[g])
  return masks


def _given_sharding(x, shardings, i):
  """The sharding of leaf i from `shardings`, else read off a concrete array; else None."""
  s = shardings[i] if shardings is not None else None
  if s is None and not isinstance(x, jax.core.Tracer) and isinstance(x, jax.Array):
    s = x.sharding
  return s


def _leaf_spec(x, shardings, i):
  """(mesh, PartitionSpec) of leaf i if known: given `shardings`, a concrete array, or explicit axes."""
  s = _given_sharding(x, shardings, i)
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


def _on_one_device(arrays, shardings) -> bool:
  """Whether no array can be split over devices, so concatenating them moves no data: one
  device in all, or every array's sharding (given, or read off a concrete array) on one."""
  if jax.device_count() == 1:
    return True
  for i, x in enumerate(arrays):
    s = _given_sharding(x, shardings, i)
    if not isinstance(s, jax.sharding.Sharding) or len(s.device_set) != 1:
      return False
  return True


def _masks(arrays, groups, ks, sizes, mesh, specs, shardings):
  """Keep-masks of all arrays; per shard inside shard_map when a mesh is given.

  Local shards (and the arrays on a single device) are scanned flattened (`_segments`); arrays
  GSPMD may partition are scanned leaf by leaf, unreshaped, so no pass gathers a leaf.
  """
  k = jnp.stack([jnp.asarray(v, jnp.int32) for v in ks])
  specs = None if specs is None else tuple(specs)
  flatten = mesh is not None or _on_one_device(arrays, shardings)
  return _masks_jit(list(arrays), k, tuple(groups), tuple(sizes), mesh, specs, flatten)


@jax.jit(static_argnums=(2, 3, 4, 5, 6))
def _masks_jit(arrays, k, groups, sizes, mesh, specs, flatten):
  """Compiled once per layout (k is traced), also when called outside jit."""
  offsets, seen = [], {}
  for x, g in zip(arrays, groups):
    offsets.append(seen.get(g, 0))
    seen[g] = offsets[-1] + x.size
  if mesh is None:
    leaves = [_Leaf(x.shape, g, o) for x, g, o in zip(arrays, groups, offsets)]
    return _select(list(arrays), leaves, k, sizes, lambda c, mn, mx: (c[None], mn[None], mx[None]),
                   flatten=flatten)
  leaves = [_Leaf(x.shape, g, o, s, mesh.shape) for x, g, o, s in zip(arrays, groups, offsets, specs)]
  axes = tuple(mesh.axis_names)

  def collect(c, mn, mx):
    # one small all-gather per round: [devices, groups, _B + 2]
    pay = jnp.concatenate([lax.bitcast_convert_type(c, jnp.uint32), mn[:, None], mx[:, None]], 1)
    allp = lax.all_gather(pay, axes, tiled=False)
    return lax.bitcast_convert_type(allp[..., :_B], jnp.int32), allp[..., _B], allp[..., _B + 1]

  def gather(keys):
    # the fixed-size key sample (~_SAMPLE per group and device), never the weights
    valid = lax.psum(jnp.sum(keys != _UMAX, axis=1, dtype=jnp.int32), axes)
    allk = lax.all_gather(keys, axes, axis=1, tiled=True)
    return allk, valid

  def body(k, *blocks):
    return tuple(_select(list(blocks), leaves, k, sizes, collect, gather, flatten))

  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), *specs), out_specs=tuple(specs),
                     check_vma=False)
  return list(fn(k, *arrays))


def prune_mask(scores: Any, sparsity: Union[float, Sequence[float], jax.Array],
               scope: Optional[str] = None, n_m: Optional[tuple[int, int]] = None,
               shardings: Any = None) -> Any:
  """Boolean keep-masks of a pytree of non-negative scores.

  Args:
    scores: pytree of arrays; `None` / `optax.MaskedNode` leaves pass through unchanged.
    sparsity: fraction in [0, 1) to drop (may be traced); for "layerwise" also a sequence
      with one fraction per array leaf. Ignored for "nm".
    scope: "global" (one threshold over all leaves), "layerwise" or "nm"; None (default):
      "nm" if `n_m` is given, else "global".
    n_m: (N, M) for scope "nm": keep N of every M along the input dimension.
    shardings: optional pytree (like `scores`) of `NamedSharding`s of the leaves. Needed inside
      jit when the mesh axes are Auto (leaves' shardings are not visible there); outside jit
      and with Explicit axes they are read from the leaves. With a mesh the work runs per
      shard in `jax.shard_map` (no gather); without, as plain jnp (one device, or GSPMD).
  """
  scope = resolve_scope(scope, n_m)
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
    masks = _masks(arrays, list(range(len(arrays))), ks, sizes, mesh, specs, sh)
  else:
    if isinstance(sparsity, (list, tuple)):
      raise ValueError("a per-leaf sparsity sequence needs scope 'layerwise'")
    total = sum(x.size for x in arrays)
    ks = [_num_dropped(sparsity, total)]
    masks = _masks(arrays, [0] * len(arrays), ks, [total], mesh, specs, sh)
  it = iter(masks)
  return jax.tree.unflatten(treedef, [x if _is_passthrough(x) else next(it) for x in leaves])
