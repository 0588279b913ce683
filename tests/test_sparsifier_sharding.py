"""Every sparsifier's init/update on abstract shapes and sharded on 8 fake devices (like optax's
sharding_test): state shapes follow the params, state shardings follow the params'."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from safe_dist.sharding import shardings_like_params
from safe_dist.sparsity import SparsifierConfig, make_optimizer, prunable_shardings

SPARSIFIERS = [("safe", "activation"), ("safe_plus", "activation"), ("safe_plus", "grad_sq"),
               ("admm", "activation"), ("gmp", "activation"), ("iht", "activation"),
               ("magnitude", "activation"), ("none", "activation")]
# distinct shapes, so that a state leaf's shape names its parameter
SPECS = {"conv": {"kernel": ((3, 3, 8, 16), P(None, None, "a", "b")), "bias": ((16,), P("b"))},
         "dense": {"kernel": ((16, 32), P("a", "b")), "bias": ((32,), P(("a", "b")))}}
_is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)


def _mesh():
  return jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _params(mesh=None):
  """Params (or their ShapeDtypeStructs without a mesh) and their shardings."""
  rng = np.random.default_rng(0)
  if mesh is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x[0], jnp.float32), SPECS,
                        is_leaf=_is_spec), None
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, x[1]), SPECS, is_leaf=_is_spec)
  params = jax.tree.map(lambda x, s: jax.device_put(rng.normal(size=x[0]).astype(np.float32), s),
                        SPECS, shardings, is_leaf=_is_spec)
  return params, shardings


def _input_sq_norms(params):
  """SAFE+ activation importance: (..., in, 1) at kernels, a scalar elsewhere."""
  return {k: {"kernel": jnp.ones((1,) * (v["kernel"].ndim - 2) + (v["kernel"].shape[-2], 1)),
              "bias": jnp.zeros([])} for k, v in params.items()}


def _optimizer(name, importance, shardings=None):
  cfg = SparsifierConfig(name=name, importance=importance, sparsity=0.7, dual_update_interval=1,
                         prune_interval=1, prune_fraction=0.0, lam=0.1)
  projection = dataclasses.replace(cfg.projection, shardings=shardings)
  return make_optimizer(cfg, optax.sgd(0.01, momentum=0.9), 10, projection=projection)


def _update(tx, params, state):
  loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))
  value_and_grad = jax.value_and_grad(loss)
  grads = value_and_grad(params)[1]
  return tx.update(grads, state, params, value_and_grad_fn=value_and_grad,
                   input_sq_norms=_input_sq_norms(params))


def _param_of(leaf, params):
  """(kind, param leaf path index) of a state leaf by its shape: "param", "packed" or None."""
  shape = tuple(leaf.shape)
  for i, p in enumerate(jax.tree.leaves(params)):
    if shape == p.shape:
      return "param", i
    if len(p.shape) >= 2 and shape == p.shape[:-1] + (math.ceil(p.shape[-1] / 8),):
      return "packed", i
  return None, None


@pytest.mark.parametrize("name,importance", SPARSIFIERS)
def test_abstract_init_and_update_follow_the_params(name, importance):
  params, _ = _params()
  tx = _optimizer(name, importance)
  state = jax.eval_shape(tx.init, params)
  updates, new_state = jax.eval_shape(functools.partial(_update, tx), params, state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert jax.tree.leaves(new_state) == jax.tree.leaves(state)  # shapes and dtypes
  assert jax.tree.leaves(updates) == jax.tree.leaves(params)
  param_leaves = jax.tree.leaves(params)
  kinds = set()
  for leaf in jax.tree.leaves(state):
    kind, i = _param_of(leaf, params)
    kinds.add(kind)
    if kind == "param":  # momentum, a (= x + u), SAFE+ grad_sq sums: float; GMP/IHT masks: bool
      assert leaf.dtype in (param_leaves[i].dtype, jnp.bool_), leaf
    elif kind == "packed":  # the ADMM keep-mask, 1 bit per weight along the last axis
      assert leaf.dtype == jnp.uint8, leaf
    elif leaf.shape:  # SAFE+ activation sums: (..., in, 1)
      assert name == "safe_plus" and leaf.shape[-1] == 1, leaf
  if name in ("safe", "safe_plus", "admm"):
    assert "packed" in kinds


def _check_derived(state_shardings, abstract_state, params, param_shardings):
  """The derived shardings: a param-shaped leaf has its param's sharding, a packed mask the
  kernel's on all but the last axis, scalars are replicated."""
  sh_leaves = jax.tree.leaves(param_shardings)
  for leaf, sh in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(state_shardings)):
    kind, i = _param_of(leaf, params)
    if kind == "param":
      assert sh.is_equivalent_to(sh_leaves[i], leaf.ndim), (leaf, sh)
    elif kind == "packed":
      want = tuple(sh_leaves[i].spec) + (None,) * leaf.ndim
      assert tuple(sh.spec)[:leaf.ndim - 1] == want[:leaf.ndim - 1], (leaf, sh)
    elif not leaf.shape:
      assert sh.is_fully_replicated, (leaf, sh)


@pytest.mark.parametrize("name,importance", SPARSIFIERS)
def test_sharded_init_and_update_keep_param_shardings(name, importance):
  mesh = _mesh()
  params, param_shardings = _params(mesh)
  tx = _optimizer(name, importance, prunable_shardings(params, param_shardings))
  abstract = jax.eval_shape(tx.init, params)
  state_shardings = shardings_like_params(abstract, params, param_shardings, mesh)
  _check_derived(state_shardings, abstract, params, param_shardings)
  state = jax.jit(tx.init, in_shardings=(param_shardings,), out_shardings=state_shardings)(params)
  # no out_shardings: what XLA propagates must already be the derived shardings
  update = jax.jit(functools.partial(_update, tx), in_shardings=(param_shardings, state_shardings))
  for _ in range(2):  # the second step runs a dual update (K = 1) / a new mask
    updates, state = update(params, state)
    resharded = jax.device_put(state, state_shardings)  # (moves only the SAFE+ sums)
    for got, want, leaf in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings),
                               jax.tree.leaves(abstract)):
      # (SAFE+ activation sums (..., in, 1) come out split like the kernel's input axis, where
      # shardings_like_params replicates them: tiny, either is fine)
      if _param_of(leaf, params)[0] or not leaf.shape:
        assert got.sharding.is_equivalent_to(want, leaf.ndim), (leaf, got.sharding, want)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(param_shardings)):
      assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    params, state = optax.apply_updates(params, updates), resharded
