"""prune_mask against a float64 numpy reference: exact counts, tie order, sharded, HLO."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from safe_dist.sparsity import topk
from helpers import collectives
from numpy_reference import keep_mask_global as _ref_global
from numpy_reference import keep_mask_nm as _ref_nm
from safe_dist.sparsity.topk import prune_mask

SPARSITIES = (0.0, 0.03, 0.5, 0.999)


def _tied(rng, shape):
  """Scores from a few integer values with many zeros: lots of ties."""
  return np.where(rng.random(shape) < 0.3, 0.0, rng.integers(0, 4, shape)).astype(np.float32)


def _check(got, want):
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), w)


def _k(s, n):
  return int(np.floor(s * n))


def _k_traced(s, n):
  return int(np.floor(np.float32(s) * np.float32(n)))


SHAPES = [(13, 7), (5,), (3, 4, 6), (1,)]


@pytest.mark.parametrize("seed", [0, 1])
def test_global_and_layerwise_unsharded(seed):
  rng = np.random.default_rng(seed)
  arrays = [_tied(rng, s) for s in SHAPES]
  arrays[0][0, :3] = rng.random(3)  # a few distinct values too
  n = sum(a.size for a in arrays)
  for s in SPARSITIES:
    _check(prune_mask(arrays, s), _ref_global(arrays, _k(s, n)))
    got = prune_mask(arrays, s, scope="layerwise")
    for g, a in zip(got, arrays):
      _check([g], _ref_global([a], _k(s, a.size)))


def test_traced_sparsity_and_per_leaf_sequence():
  rng = np.random.default_rng(2)
  arrays = [_tied(rng, s) for s in SHAPES]
  n = sum(a.size for a in arrays)
  fn = jax.jit(lambda a, s: prune_mask(a, s))
  for s in SPARSITIES:
    _check(fn(arrays, jnp.float32(s)), _ref_global(arrays, _k_traced(s, n)))
  per_leaf = [0.5, 0.0, 0.9, 0.0]
  got = prune_mask(arrays, per_leaf, scope="layerwise")
  for g, a, s in zip(got, arrays, per_leaf):
    _check([g], _ref_global([a], _k(s, a.size)))
  got = jax.jit(lambda a, s: prune_mask(a, [s, 0.0, s, 0.25], scope="layerwise"))(
      arrays, jnp.float32(0.5))
  for g, a, s in zip(got, arrays, [0.5, 0.0, 0.5, 0.25]):
    _check([g], _ref_global([a], _k_traced(s, a.size)))


def _reduces(num_leaves, one_device):
  """prune_mask inside jit over `num_leaves` leaves: its masks and its lowered reduce count."""
  rng = np.random.default_rng(num_leaves)
  arrays = [_tied(rng, (5, 3 + i)) for i in range(num_leaves)]
  sh = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * num_leaves if one_device else None
  fn = jax.jit(lambda x: prune_mask(x, 0.6, shardings=sh))
  n = sum(a.size for a in arrays)
  _check(fn(arrays), _ref_global(arrays, _k(0.6, n)))
  return fn.lower(arrays).as_text().count("stablehlo.reduce")


def test_leaves_on_one_device_are_scanned_as_one():
  """With shardings on one device the leaves are concatenated: the program's counting passes
  (and so its compile time) do not grow with the number of leaves; GSPMD-partitionable leaves
  (no shardings inside jit, 8 devices here) keep one pass per leaf."""
  assert _reduces(2, True) == _reduces(12, True)
  assert _reduces(12, False) > _reduces(2, False)


def test_joined_small_leaves_around_a_large_one_split_ties_by_position():
  """On one device the small leaves are joined, the large one (> _JOIN_MAX) scanned alone: the
  joined positions are not consecutive, and ties at the threshold still go by tree position."""
  rng = np.random.default_rng(11)
  big = topk._JOIN_MAX + 37
  arrays = [_tied(rng, (7, 9)), rng.integers(0, 3, big).astype(np.float32), _tied(rng, (50,))]
  n = sum(a.size for a in arrays)
  for s in (0.3, 0.5, 0.77):
    _check(prune_mask(arrays, s), _ref_global(arrays, _k(s, n)))


def test_nm():
  rng = np.random.default_rng(3)
  arrays = [_tied(rng, (8, 3)), _tied(rng, (2, 2, 12, 5))]
  got = prune_mask(arrays, 0.0, scope="nm", n_m=(2, 4))
  _check(got, [_ref_nm(a, 2, 4) for a in arrays])
  with pytest.raises(ValueError):
    prune_mask([np.ones((6, 3), np.float32)], 0.0, scope="nm", n_m=(2, 4))


def test_n_m_alone_means_nm_and_conflicts_with_other_scopes():
  rng = np.random.default_rng(3)
  arrays = [_tied(rng, (8, 3)), rng.random((4, 5)).astype(np.float32)]
  _check(prune_mask(arrays, 0.5, n_m=(2, 4)), [_ref_nm(a, 2, 4) for a in arrays])
  for scope in ("global", "layerwise"):
    with pytest.raises(ValueError, match="needs scope 'nm'"):
      prune_mask(arrays, 0.5, scope=scope, n_m=(2, 4))
  with pytest.raises(ValueError, match="needs n_m"):
    prune_mask(arrays, 0.5, scope="nm")


def test_passthrough_and_nonfinite():
  rng = np.random.default_rng(4)
  a, b = _tied(rng, (6, 5)), _tied(rng, (7,))
  tree = {"a": a, "n": None, "m": optax.MaskedNode(), "b": b}
  got = prune_mask(tree, 0.5)
  assert got["n"] is None and isinstance(got["m"], optax.MaskedNode)
  _check([got["a"], got["b"]], _ref_global([a, b], _k(0.5, a.size + b.size)))
  for bad in (np.nan, np.inf):
    c = a.copy()
    c[1, 1] = bad
    with pytest.raises(ValueError):
      prune_mask([c, b], 0.5)
  # inside jit: not checked; +inf ranks above every finite score, so it is kept
  c = a.copy()
  c[0, 0] = np.inf
  assert bool(jax.jit(lambda x: prune_mask(x, 0.9))(c)[0, 0])


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _sharded_case(seed):
  mesh = _mesh((4, 2), ("a", "b"))
  shapes_specs = [((16, 6), P("a", "b")), ((6, 12), P("b", "a")), ((7,), P()),
                  ((4, 12, 3), P(None, "a")), ((10, 3), P("b")), ((24,), P(("a", "b")))]
  rng = np.random.default_rng(seed)
  arrays = [_tied(rng, s) for s, _ in shapes_specs]
  shardings = [NamedSharding(mesh, sp) for _, sp in shapes_specs]
  xs = [jax.device_put(a, s) for a, s in zip(arrays, shardings)]
  return arrays, xs, shardings


def test_sharded_4x2_mesh():
  arrays, xs, shardings = _sharded_case(5)
  n = sum(a.size for a in arrays)
  glob = jax.jit(lambda x, s: prune_mask(x, s, shardings=shardings))
  lw = jax.jit(lambda x, s: prune_mask(x, s, scope="layerwise", shardings=shardings))
  for s in SPARSITIES:
    _check(prune_mask(xs, s), _ref_global(arrays, _k(s, n)))  # eager: shardings read off xs
    got = glob(xs, jnp.float32(s))
    _check(got, _ref_global(arrays, _k_traced(s, n)))
    assert got[0].sharding.spec == shardings[0].spec
    for g, a in zip(lw(xs, jnp.float32(s)), arrays):
      _check([g], _ref_global([a], _k_traced(s, a.size)))
  # without shardings inside jit: plain jnp, partitioned by GSPMD
  _check(jax.jit(lambda x: prune_mask(x, 0.5))(xs), _ref_global(arrays, _k(0.5, n)))
  got = prune_mask([xs[0], xs[3]], 0.0, scope="nm", n_m=(2, 4))
  _check(got, [_ref_nm(arrays[0], 2, 4), _ref_nm(arrays[3], 2, 4)])


def test_sharded_8_mesh_large():
  mesh = _mesh((8,), ("d",))
  rng = np.random.default_rng(6)
  arrays = [_tied(rng, (64, 40)), rng.random((8, 8, 3)).astype(np.float32), _tied(rng, (9,))]
  specs = [P("d"), P(None, "d"), P()]
  shardings = [NamedSharding(mesh, sp) for sp in specs]
  xs = [jax.device_put(a, s) for a, s in zip(arrays, shardings)]
  n = sum(a.size for a in arrays)
  fn = jax.jit(lambda x, s: prune_mask(x, s, shardings=shardings))
  for s in SPARSITIES + (0.9,):
    _check(fn(xs, jnp.float32(s)), _ref_global(arrays, _k_traced(s, n)))


def test_sharded_few_ties_and_hard_distributions():
  """Tie splits via per-device min/max (<= 2 tied entries per device) and via the position
  search (more on one device); distributions that defeat the sample or the interpolation."""
  mesh = _mesh((8,), ("d",))
  sh = NamedSharding(mesh, P("d"))
  n = 8 * 512
  rng = np.random.default_rng(8)
  base = (rng.permutation(n) / n).astype(np.float32)
  med = base[np.argsort(base)[n // 2]]
  few = base.copy()
  few[[5, 700, 3000]] = med  # one tie per device, on three devices
  many = base.copy()
  many[[1030, 1100, 1200, 1300, 1500]] = med  # five tied entries on device 2
  i = np.arange(n)
  periodic = np.where(i % 8 == 0, 0.0, 1.0 + i * 1e-6).astype(np.float32)  # strided sample: 0s
  spread = (2.0 ** rng.uniform(-100, 100, n)).astype(np.float32)
  clusters = np.where(rng.random(n) < 0.5, 1e-30, 1e30).astype(np.float32) * (
      1 + rng.random(n).astype(np.float32) * 1e-3)
  ascending = np.sort(rng.random(n).astype(np.float32))
  fn = jax.jit(lambda x, s: prune_mask(x, s, shardings=sh))
  for a in (few, many, periodic, spread, clusters, ascending):
    x = jax.device_put(a, sh)
    for s in SPARSITIES + (0.5, 0.5005, 0.9, 0.12501):  # 0.5005: k = 2050 splits the ties
      _check([fn(x, jnp.float32(s))], _ref_global([a], _k_traced(s, n)))


def _compiledcollectives(scale):
  mesh = _mesh((4, 2), ("a", "b"))
  shapes_specs = [((16 * scale, 6), P("a", "b")), ((6, 12 * scale), P("b", "a")), ((7,), P())]
  rng = np.random.default_rng(9)
  shardings = [NamedSharding(mesh, sp) for _, sp in shapes_specs]
  xs = [jax.device_put(_tied(rng, s), sh) for (s, _), sh in zip(shapes_specs, shardings)]
  hlo = jax.jit(lambda x, s: prune_mask(x, s, shardings=shardings)).lower(
      xs, jnp.float32(0.5)).compile().as_text()
  return collectives(hlo)


def test_hlo_collectives_do_not_grow_with_size():
  """Shard_map path: only small all-gathers / all-reduces (per-round stats, the fixed-size key
  sample), the same for leaves 8x larger: the weights are never gathered."""
  small, large = _compiledcollectives(64), _compiledcollectives(512)
  assert small and sorted(small) == sorted(large), (small, large)
  bound = 8 * (topk._SAMPLE + 3)
  assert all(op in ("all-gather", "all-reduce") and size <= bound for op, size in large), large


def test_hlo_no_gather_of_weights():
  arrays, xs, shardings = _sharded_case(7)
  hlo = jax.jit(lambda x, s: prune_mask(x, s, shardings=shardings)).lower(
      xs, jnp.float32(0.5)).compile().as_text()
  ops = collectives(hlo)
  # per-round stats ([devices, groups, _B + 2]) and the key sample (8 x ~_SAMPLE): no leaf data
  bound = 8 * (topk._SAMPLE + len(arrays))
  assert ops and all(op in ("all-gather", "all-reduce") and size <= bound for op, size in ops), ops
  # GSPMD fallback (no shardings given): only tiny partial-sum gathers, nothing of leaf size
  hlo = jax.jit(lambda x: prune_mask(x, 0.5)).lower(xs).compile().as_text()
  ops = collectives(hlo)
  assert all(op != "all-to-all" and size <= 16 for op, size in ops), ops
