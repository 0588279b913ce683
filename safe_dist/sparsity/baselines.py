"""Gradual and one-shot pruning baselines (GMP, IHT, one-shot magnitude) as optax transformations.

All three project the weights after the base optimizer's step: placed last in an
`optax.chain`, the transformation rewrites the updates so that x_new = (x + updates) * mask.
They differ only in when the mask is recomputed and whether it may grow back:
- IHT: every step, from |x + updates| at the scheduled sparsity (the mask may change freely).
- GMP: every `interval` steps until the schedule ends; the mask only shrinks.
- one-shot magnitude: once, at `prune_step`; the mask then stays fixed (fine-tuning).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity.projection import Projection


class MaskState(NamedTuple):
  """count: steps taken; mask: the current keep-mask of each prunable kernel."""
  count: jax.Array
  mask: optax.Params


def project_after_step(projection: Projection, sparsity_fn: optax.Schedule,
                       should_update: Callable[[jax.Array], jax.Array],
                       only_shrink: bool) -> optax.GradientTransformation:
  """Masks the stepped weights; recomputes the mask at steps where `should_update(count)`."""

  def init_fn(params):
    return MaskState(count=jnp.zeros([], jnp.int32),
                     mask=jax.tree.map(lambda x: jnp.ones(x.shape, bool), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("pruning transformations need params: update(grads, state, params)")
    stepped = jax.tree.map(lambda x, d: x + d, params, updates)

    def new_mask(_):
      scores = jax.tree.map(jnp.abs, stepped)
      if only_shrink:  # pruned weights score 0, so the dropped set can only grow
        scores = jax.tree.map(lambda s, m: jnp.where(m, s, 0), scores, state.mask)
      return projection.masks(scores, sparsity_fn(state.count))

    mask = jax.lax.cond(should_update(state.count), new_mask, lambda _: state.mask, None)
    updates = jax.tree.map(lambda x, s, m: jnp.where(m, s, 0).astype(x.dtype) - x,
                           params, stepped, mask)
    return updates, MaskState(count=state.count + 1, mask=mask)

  return optax.GradientTransformation(init_fn, update_fn)


def iht(projection: Projection, sparsity_fn: optax.Schedule) -> optax.GradientTransformation:
  """Iterative hard thresholding: project onto the scheduled sparse set after every step."""
  return project_after_step(projection, sparsity_fn, lambda count: count >= 0, only_shrink=False)


def gmp(projection: Projection, sparsity_fn: optax.Schedule, interval: int,
        end_step: int) -> optax.GradientTransformation:
  """Gradual magnitude pruning (Zhu and Gupta 2018): shrink the mask every `interval` steps."""
  if interval < 1:
    raise ValueError(f"the GMP pruning interval must be >= 1, got {interval}")
  return project_after_step(
      projection, sparsity_fn,
      lambda count: (count % interval == 0) | (count == end_step), only_shrink=True)


def one_shot_magnitude(projection: Projection, prune_step: int) -> optax.GradientTransformation:
  """Dense until `prune_step`, then prune once by magnitude and keep the mask fixed."""
  return project_after_step(projection, lambda _: projection.sparsity,
                            lambda count: count == prune_step, only_shrink=False)
