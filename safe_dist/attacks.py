"""Projected gradient descent (PGD) adversarial examples for evaluation.

`make_pgd_attack` returns one pure function with the whole loop inside (`lax.fori_loop`), so
it is jitted once with the batch sharded on the data axis. Images are floats in [0, 1]
(models normalise internally); the ball is taken around the clean image per example.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")


def validate(norm: str, steps: int, bound: float, lr: float) -> None:
  """ValueError naming the flag of the first bad attack setting."""
  if norm not in NORMS:
    raise ValueError(f"--attack_norm must be one of {', '.join(NORMS)}; got {norm!r}")
  if int(steps) != steps or steps < 1:
    raise ValueError(f"--attack_steps must be an integer >= 1, got {steps}")
  if not (math.isfinite(bound) and bound > 0):
    raise ValueError(f"--attack_bound must be a number > 0, got {bound}")
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"--attack_lr must be a number > 0, got {lr}")


def _per_example_l2(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def project(x, clean, norm: str, bound: float, pixel_range=(0.0, 1.0)):
  """Onto the `norm` ball of radius `bound` around `clean`, then onto the pixel range.

  Clipping to the box only shrinks |x - clean| per coordinate (clean lies in the box), so
  the result stays inside the ball.
  """
  delta = x - clean
  if norm == "linf":
    delta = jnp.clip(delta, -bound, bound)
  else:
    delta = delta * jnp.minimum(1.0, bound / jnp.maximum(_per_example_l2(delta), 1e-12))
  x = clean + delta
  return jnp.clip(x, *pixel_range) if pixel_range is not None else x


def _random_start(key, clean, norm: str, bound: float):
  if norm == "linf":
    return jax.random.uniform(key, clean.shape, clean.dtype, -bound, bound)
  # Uniform in the l2 ball: a random direction, radius bound * U^(1/d).
  dir_key, r_key = jax.random.split(key)
  direction = jax.random.normal(dir_key, clean.shape, clean.dtype)
  direction = direction / jnp.maximum(_per_example_l2(direction), 1e-12)
  dim = clean[0].size
  radius = jax.random.uniform(r_key, (clean.shape[0],) + (1,) * (clean.ndim - 1), clean.dtype)
  return direction * bound * radius ** (1.0 / dim)


def make_pgd_attack(loss_fn: Callable, norm: str, steps: int, bound: float, lr: float,
                    pixel_range=(0.0, 1.0)) -> Callable:
  """attack(params, batch_stats, batch, key) -> adversarial batch["image"] (float32).

  loss_fn(params, batch_stats, batch): the eval-mode loss summed over the batch
  (`tasks.make_eval_loss(model, task, reduce="sum")`), so that an example's gradient does not
  shrink with the batch size. Random start inside the ball, then `steps` ascent steps on it:
  lr * sign(grad) for linf, lr * grad / ||grad||_2 per example for l2, each followed by
  projection. pixel_range=None disables the pixel clip.
  """
  validate(norm, steps, bound, lr)
  steps = int(steps)
  grad_fn = jax.grad(lambda images, params, batch_stats, batch: loss_fn(
      params, batch_stats, {**batch, "image": images}))

  def attack(params, batch_stats, batch, key):
    clean = batch["image"].astype(jnp.float32)
    x = project(clean + _random_start(key, clean, norm, bound), clean, norm, bound, pixel_range)

    def body(_, x):
      g = grad_fn(x, params, batch_stats, batch)
      if norm == "linf":
        step = jnp.sign(g)
      else:
        step = g / jnp.maximum(_per_example_l2(g), 1e-12)
      return project(x + lr * step, clean, norm, bound, pixel_range)

    return jax.lax.fori_loop(0, steps, body, x)

  return attack
