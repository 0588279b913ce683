"""SparseGPT and Wanda on one kernel: a naive float64 OBS reference, invariances, exact counts,
reconstruction error against magnitude pruning, and sharded runs on the 8 fake devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from numpy_reference import keep_mask_global, keep_mask_nm
from safe_dist.layerwise import sparsegpt, wanda
from safe_dist.sharding import MeshConfig, make_mesh

# One layer shape (fewer compilations; each unstructured block shape compiles a selection):
# float32 tests in blocks of 16 rows, s * N with a fractional part for s = 0.3 and 0.7 (per
# block, and per column); the float64 reference test also in blocks of 20, the last one of 8.
N_IN, N_OUT, BLOCK = 48, 16, 16
sparsegpt_16 = functools.partial(sparsegpt, block_size=BLOCK)


def _inputs(rng, n, n_in, outliers=(), scale=20.0):
  """Correlated calibration inputs X = Z @ A (n tokens), a few channels scaled up."""
  x = rng.standard_normal((n, n_in)) @ rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
  x[:, list(outliers)] *= scale
  return x


def _hessian(x):
  return 2.0 / x.shape[0] * x.T @ x


def _layer(seed, n_in=N_IN, n_out=N_OUT, ints=False, n=128, outliers=(1, 7)):
  """float32 (x, w, H, sum of x^2 per input); integer-valued weights have many tied |w|."""
  rng = np.random.default_rng(seed)
  x = _inputs(rng, n, n_in, outliers)
  w = rng.integers(-4, 5, (n_in, n_out)) if ints else rng.standard_normal((n_in, n_out))
  return (x, w.astype(np.float32), _hessian(x).astype(np.float32),
          np.sum(x**2, axis=0).astype(np.float32))


def _naive_sparsegpt(w, h, sparsity, n_m=None, block_size=None, damp=0.01):
  """Sequential OBS in float64, input by input, straight from the definition (no Cholesky
  tricks, no lazy updates): the surviving inputs j.. have inverse Hessian inv(H[j:, j:])."""
  w, h = np.array(w, np.float64), np.array(h, np.float64)
  n_in = w.shape[0]
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[dead] = 0
  h += damp * np.mean(np.diag(h)) * np.eye(n_in)
  group = (block_size or n_in) if n_m is None else n_m[1]
  keep = np.ones(w.shape, bool)
  for j in range(n_in):
    h_inv = np.linalg.inv(h[j:, j:])
    if j % group == 0:  # decide the mask of rows j..j + group from the current weights
      u_diag = np.diag(np.linalg.cholesky(h_inv))  # = diag of the upper factor of h_inv
      end = min(j + group, n_in)
      scores = w[j:end]**2 / u_diag[:end - j, None]**2
      keep[j:end] = (keep_mask_global([scores], int(np.floor(sparsity * scores.size)))[0]
                     if n_m is None else keep_mask_nm(scores, *n_m))
    q = np.where(keep[j], w[j], 0)
    w[j:] -= np.outer(h_inv[0], (w[j] - q) / h_inv[0, 0])
    w[j] = q  # where the update lands it, up to rounding
  return w, keep


@pytest.mark.parametrize("block_size,n_m,sparsity", [(N_IN, None, 0.5), (20, None, 0.3),
                                                     (20, (2, 4), 0.5)])
def test_sparsegpt_matches_naive_obs_in_float64(block_size, n_m, sparsity):
  """One block, and blocks of 20 rows (the last one 8, floor(0.3 * 8 * 16) = 38 zeros); N:M
  decided every M rows. (prune_mask ranks float32-rounded scores: random ones have no ties.)"""
  rng = np.random.default_rng(block_size)
  x = _inputs(rng, 96, N_IN)
  x[:, 5] = 0  # a dead input
  h = _hessian(x)
  w = rng.standard_normal((N_IN, N_OUT))
  want_w, want_keep = _naive_sparsegpt(w, h, sparsity, n_m, block_size)
  with jax.enable_x64(True):
    got_w, got_keep = sparsegpt(jnp.asarray(w), jnp.asarray(h), sparsity, n_m=n_m,
                                block_size=block_size)
    assert got_w.dtype == jnp.float64
  np.testing.assert_array_equal(np.asarray(got_keep), want_keep)
  np.testing.assert_allclose(np.asarray(got_w), want_w, rtol=0, atol=1e-10)
  assert not np.any(want_w[5])


def test_sparsegpt_ignores_the_hessian_scale():
  _, w, h, _ = _layer(1)
  for n_m in (None, (2, 4)):
    base_w, base_keep = sparsegpt_16(w, h, 0.5, n_m=n_m)
    for c in (3.7, 1 / 64):
      got_w, got_keep = sparsegpt_16(w, np.float32(c) * h, 0.5, n_m=n_m)
      np.testing.assert_array_equal(got_keep, base_keep)
      np.testing.assert_allclose(got_w, base_w, rtol=1e-5, atol=1e-5)


def _blocks(a):
  return np.split(np.asarray(a), range(BLOCK, N_IN, BLOCK))


def _keep_magnitude(w, n_m=None, sparsity=0.5):
  """Per-kernel magnitude pruning (or N:M), ties: lower position kept."""
  if n_m is not None:
    return keep_mask_nm(np.abs(w), *n_m)
  return keep_mask_global([np.abs(w)], int(np.floor(sparsity * w.size)))[0]


def test_sparsegpt_with_orthogonal_inputs_is_blockwise_magnitude():
  """One-hot tokens of equal norm: H = c I, so no error moves; the kept weights stay bit-equal."""
  _, w, _, _ = _layer(2, ints=True)
  h = _hessian(3.0 * np.eye(N_IN)).astype(np.float32)
  for n_m in (None, (2, 4)):
    got_w, got_keep = sparsegpt_16(w, h, 0.5, n_m=n_m)
    want = np.concatenate([_keep_magnitude(b, n_m) for b in _blocks(w)])
    np.testing.assert_array_equal(got_keep, want)
    np.testing.assert_array_equal(got_w, np.where(want, w, 0))


def test_wanda_with_equal_input_norms_is_per_output_magnitude():
  _, w, _, _ = _layer(3, ints=True)
  norms = np.full(N_IN, 2.5, np.float32)
  for s in (0.3, 0.5, 0.7):
    got_w, got_keep = wanda(w, norms, s)
    want = np.stack([_keep_magnitude(c, sparsity=s) for c in w.T], 1)
    np.testing.assert_array_equal(got_keep, want)
    np.testing.assert_array_equal(got_w, np.where(want, w, 0))
  for n_m in ((2, 4), (4, 8)):
    np.testing.assert_array_equal(wanda(w, norms, 0.5, n_m=n_m)[1], _keep_magnitude(w, n_m))


@pytest.mark.parametrize("n_in,n_out", [(N_IN, N_OUT), (44, 7)])
def test_exact_counts_with_ties(n_in, n_out):
  """floor(s * N) zeros per block (SparseGPT) or per output column (Wanda); N kept of every M.
  Integer weights: many tied scores. SparseGPT on one shape only (each compiles anew; the
  float64 reference test covers a shorter last block)."""
  _, w, h, norms = _layer(n_in, n_in, n_out, ints=True)
  methods = [(wanda, norms, lambda k: k.T)] + ([(sparsegpt_16, h, _blocks)] if n_in == N_IN else [])
  for s in (0.3, 0.5, 0.7):
    for fn, arg, counted in methods:
      got_w, keep = (np.asarray(a) for a in fn(w, arg, s))
      assert not np.any(got_w[~keep])
      for part in counted(keep):
        assert np.sum(~part) == int(np.floor(s * part.size)), (fn, s, part.shape)
  if n_in % 8:
    return
  for n_m in ((2, 4), (4, 8)):
    for fn, arg, _ in methods:
      kept = np.asarray(fn(w, arg, 0.5, n_m=n_m)[1]).reshape(-1, n_m[1], n_out).sum(axis=1)
      np.testing.assert_array_equal(kept, n_m[0])


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(n_m):
  x, w, h, norms = _layer(4, n=512, outliers=(3, 17, 30))
  err = lambda pruned: np.linalg.norm(x @ (w - np.asarray(pruned, np.float64)))
  e_sparsegpt = err(sparsegpt_16(w, h, 0.5, n_m=n_m)[0])
  e_wanda = err(wanda(w, norms, 0.5, n_m=n_m)[0])
  e_magnitude = err(np.where(_keep_magnitude(w, n_m), w, 0))
  assert e_sparsegpt < e_wanda < e_magnitude, (e_sparsegpt, e_wanda, e_magnitude)


def _sharding(mesh_3d):
  """w's out axis over a 1-D mesh of 8, or over ("fsdp", "tensor") of the 2x2x2 mesh, there
  with the input axis over "data" (sparsegpt lays the inputs out whole)."""
  if mesh_3d:
    return NamedSharding(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                         P("data", ("fsdp", "tensor")))
  return NamedSharding(jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,)),
                       P(None, "x"))


@pytest.mark.parametrize("mesh_3d,n_m", [(False, None), (True, (2, 4))])
def test_sharded_over_outputs_matches_one_device(mesh_3d, n_m):
  """SparseGPT with `n_m` (each sharded case compiles anew), Wanda with both patterns."""
  sharding = _sharding(mesh_3d)
  _, w, h, norms = _layer(5)
  w_sharded = jax.device_put(w, sharding)
  for fn, arg, pattern in ((sparsegpt_16, h, n_m), (wanda, norms, None), (wanda, norms, (2, 4))):
    want_w, want_keep = fn(w, arg, 0.5, n_m=pattern)
    got_w, got_keep = fn(w_sharded, arg, 0.5, n_m=pattern, sharding=sharding)
    np.testing.assert_array_equal(got_keep, want_keep)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-5)


def test_sparsegpt_nm_needs_blocks_of_whole_groups():
  _, w, h, _ = _layer(6)
  with pytest.raises(ValueError, match="multiples of M"):
    sparsegpt(w, h, 0.5, n_m=(2, 4), block_size=18)
