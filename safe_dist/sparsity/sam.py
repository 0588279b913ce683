"""Sharpness-aware gradient (Foret et al. 2021) as an optax transformation with an extra argument.

Like `optax.contrib.sam` in opaque mode, the caller passes a gradient function:
    updates, state = tx.update(grads, state, params, value_and_grad_fn=f)
where `f(params) -> (loss, grads)` evaluates the loss at perturbed params (for BatchNorm
models: with batch statistics, writing no running statistics). The incoming `grads` are the
gradient at `params`, already averaged over the global batch; the output is
grad f(x + e) with e = rho g / ||g||, one global norm over all parameters.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from safe_dist.sparsity.projection import stat_dtype


class SAMState(NamedTuple):
  """perturbed_loss: f(x + e) of the last step (f(x + e) - f(x) is the SAM sharpness), in
  `stat_dtype` of the params."""
  perturbed_loss: jax.Array


def sam_gradient(rho: float, eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  """Replaces the gradient by the gradient at the SAM-perturbed point x + rho g / ||g||."""
  if rho < 0:
    raise ValueError(f"--rho must be >= 0, got {rho}")

  def init_fn(params):
    return SAMState(perturbed_loss=jnp.zeros([], stat_dtype(params)))

  def update_fn(updates, state, params=None, *, value_and_grad_fn, **extra_args):
    del extra_args
    scale = rho / (optax.tree.norm(updates) + eps)
    perturbed = jax.tree.map(lambda x, g: x + (scale * g).astype(x.dtype), params, updates)
    loss, grads = value_and_grad_fn(perturbed)
    return grads, SAMState(perturbed_loss=jnp.asarray(loss, state.perturbed_loss.dtype))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
