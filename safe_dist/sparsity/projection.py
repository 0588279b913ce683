"""Which weights are prunable, and the hard projection Proj_d applied to them."""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity.topk import prune_mask, resolve_scope


def _is_prunable_leaf(path, leaf) -> bool:
  # Convolution and dense kernels; biases, norm parameters and embeddings are never pruned.
  last = path[-1]
  name = getattr(last, "key", getattr(last, "name", None))
  if name == "value" and len(path) > 1:  # a flax LogicallyPartitioned box around the array
    last = path[-2]
    name = getattr(last, "key", getattr(last, "name", None))
  return name == "kernel" and getattr(leaf, "ndim", 0) >= 2


def prunable_tree(params) -> Any:
  """A pytree of bools over `params`: True on conv and dense kernels."""
  return jax.tree_util.tree_map_with_path(_is_prunable_leaf, params)


def prunable_leaves(params) -> list:
  """The prunable arrays of `params`, in tree order."""
  flags = jax.tree.leaves(prunable_tree(params))
  return [x for x, f in zip(jax.tree.leaves(params), flags) if f]


def _not_masked(x) -> bool:
  return not isinstance(x, optax.MaskedNode)


@dataclasses.dataclass(frozen=True)
class Projection:
  """Proj_d: keep the largest scores, exactly `sparsity` of them dropped, over a scope.

  Operates on trees that hold only prunable leaves (other positions are `optax.MaskedNode`),
  as inside `optax.masked`, or on full parameter trees through `project_params`.
  scope None means "nm" when `n_m` is given, else "global" (see `topk.resolve_scope`); it is
  stored resolved.
  """
  sparsity: float
  scope: Optional[str] = None
  n_m: Optional[tuple[int, int]] = None
  # NamedShardings of the prunable leaves (MaskedNode elsewhere): with them the projection
  # runs per shard inside jit (see `prune_mask`); `prunable_shardings` builds the tree.
  shardings: Any = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "scope", resolve_scope(self.scope, self.n_m))
    if self.scope != "nm" and not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"--sp must be in [0, 1), got {self.sparsity}")

  @property
  def target_sparsity(self) -> float:
    if self.scope == "nm":
      return 1.0 - self.n_m[0] / self.n_m[1]
    return self.sparsity

  def masks(self, scores, sparsity=None):
    """Boolean keep-masks of a tree of non-negative scores (MaskedNode leaves pass through)."""
    sparsity = self.sparsity if sparsity is None else sparsity
    return prune_mask(scores, sparsity, scope=self.scope, n_m=self.n_m,
                      shardings=self.shardings)

  def masks_of_weights(self, weights, sparsity=None):
    return self.masks(jax.tree.map(jnp.abs, weights), sparsity)

  def project_params(self, params, sparsity=None):
    """Proj_d(params): prunable kernels masked by magnitude, everything else unchanged."""
    flags = prunable_tree(params)
    only_prunable = jax.tree.map(lambda p, f: p if f else optax.MaskedNode(), params, flags)
    masks = self.masks_of_weights(only_prunable, sparsity)
    return jax.tree.map(
        lambda p, f, m: p * m.astype(p.dtype) if f else p, params, flags, masks,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def prunable_shardings(params, shardings) -> Any:
  """`shardings` (a tree like `params`) kept at the prunable leaves, MaskedNode elsewhere."""
  return jax.tree.map(lambda s, f: s if f else optax.MaskedNode(), shardings,
                      prunable_tree(params))


def stat_dtype(tree) -> jnp.dtype:
  """The dtype of statistics (norms, fractions, lambda) about `tree`: float32, or wider for
  wider leaves (float64 params under jax_enable_x64)."""
  return functools.reduce(jnp.promote_types, [x.dtype for x in jax.tree.leaves(tree)],
                          jnp.dtype(jnp.float32))


def tree_norm(leaves, dtype) -> jax.Array:
  """The global L2 norm of a list of arrays, accumulated in `dtype`."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves))


def zero_fraction(leaves, dtype) -> jax.Array:
  """Fraction of exact zeros among a list of arrays, in `dtype`."""
  # int32 counts per leaf (each < 2^31), summed across leaves in `dtype`
  zeros = sum(jnp.sum(x == 0, dtype=jnp.int32).astype(dtype) for x in leaves)
  return zeros / jnp.asarray(sum(x.size for x in leaves), dtype)


def weight_sparsity(params) -> jax.Array:
  """Fraction of exact zeros among the prunable weights."""
  return zero_fraction(prunable_leaves(params), stat_dtype(params))
