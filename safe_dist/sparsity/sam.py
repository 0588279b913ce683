"""Sharpness-aware gradient (Foret et al. 2021) as an optax transformation with an extra argument.

Like `optax.contrib.sam` in opaque mode, the caller passes a gradient function:
    updates, state = tx.update(grads, state, params, value_and_grad_fn=f)
where `f(params) -> (loss, grads)` evaluates the loss at perturbed params (for BatchNorm
models: with batch statistics, writing no running statistics). The incoming `grads` are the
gradient at `params`, already averaged over the global batch; the output is
grad f(x + e) with e = rho g / ||g||, one global norm over all parameters.

m-sharpness (Foret et al., section 4.1; google-research/sam): with `group_grads=` (each group
g's gradient at params, stacked along a leading group axis), every group gets its own
perturbation e_g = rho g_g / ||g_g||, `f` maps the stacked points x + e_g to each group's
(loss, gradient), stacked, and the output is the mean over groups of grad f_g(x + e_g).
The incoming `grads` are not used then.

Norms are accumulated in float32 at least (`stat_dtype`), whatever the gradients' dtype.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity.projection import stat_dtype


class SAMState(NamedTuple):
  """perturbed_loss: f(x + e) of the last step (f(x + e) - f(x) is the SAM sharpness; with
  groups, the mean over groups of f_g(x + e_g)), in `stat_dtype` of the params."""
  perturbed_loss: jax.Array


def group_mean(tree):
  """The mean over the leading (group) axis of every leaf.

  Written as a product with a vector of 1/groups: XLA's CPU backend ran a reduction over a
  leading axis split across devices 20-50x slower than this on weight-sized leaves;
  HIGHEST keeps it float32 where matmuls would otherwise round (TF32, bfloat16 passes).
  """

  def mean(x):
    weights = jnp.full(x.shape[:1], 1.0 / x.shape[0], x.dtype)
    return jnp.tensordot(weights, x, axes=1, precision=jax.lax.Precision.HIGHEST)

  return jax.tree.map(mean, tree)


def _ascent_point(params, grads, rho: float, eps: float):
  """x + rho g / (||g|| + eps), the norm over all leaves in float32 at least."""
  dtype = stat_dtype(grads)
  scale = rho / (optax.tree.norm(jax.tree.map(lambda g: g.astype(dtype), grads)) + eps)
  return jax.tree.map(lambda x, g: x + (scale * g).astype(x.dtype), params, grads)


def sam_gradient(rho: float, eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  """Replaces the gradient by the gradient at the SAM-perturbed point x + rho g / ||g||
  (with `group_grads=`: the mean over groups of the gradients at x + e_g, see above)."""
  if rho < 0:
    raise ValueError(f"--rho must be >= 0, got {rho}")

  def init_fn(params):
    return SAMState(perturbed_loss=jnp.zeros([], stat_dtype(params)))

  def update_fn(updates, state, params=None, *, value_and_grad_fn, group_grads=None,
                **extra_args):
    del extra_args
    if group_grads is None:
      loss, grads = value_and_grad_fn(_ascent_point(params, updates, rho, eps))
    else:
      points = jax.vmap(_ascent_point, in_axes=(None, 0, None, None))(params, group_grads,
                                                                      rho, eps)
      loss, grads = group_mean(value_and_grad_fn(points))
    return grads, SAMState(perturbed_loss=jnp.asarray(loss, state.perturbed_loss.dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
