"""Schedules of the penalty lambda(t) and of the target sparsity s(t), as optax schedules of the step.

They compute in JAX's default float type: float32, or float64 under jax_enable_x64 (so that
float64 runs are float64 throughout); the sparsifiers cast lambda(t) to the params' dtype.
"""

import jax.numpy as jnp
import numpy as np
import optax

LAMBDA_SCHEDULES = ("constant", "linear", "cosine")
SPARSITY_SCHEDULES = ("constant", "linear", "cosine", "cubic")


def _progress(step, begin: int, span: int) -> jnp.ndarray:
  """(step - begin) / span clipped to [0, 1], in the default float type."""
  return jnp.clip((jnp.asarray(step, float) - begin) / span, 0.0, 1.0)


def penalty_schedule(lam: float, kind: str, total_steps: int) -> optax.Schedule:
  """lambda(t) of SPEC.md: constant, linear (lam t / T) or cosine (lam (1 - cos(pi t / T)) / 2)."""
  if kind not in LAMBDA_SCHEDULES:
    raise ValueError(f"--lambda_schedule must be one of {LAMBDA_SCHEDULES}, got {kind!r}")
  if lam < 0:
    raise ValueError(f"--lambda must be >= 0, got {lam}")
  if kind == "constant":
    return optax.constant_schedule(lam)
  total = max(int(total_steps), 1)

  def schedule(step):
    frac = _progress(step, 0, total)
    if kind == "linear":
      return lam * frac
    return lam * (1.0 - jnp.cos(jnp.pi * frac)) / 2.0

  return schedule


def sparsity_schedule(final: float, kind: str, begin_step: int, end_step: int,
                      initial: float = 0.0) -> optax.Schedule:
  """s(t) rising from `initial` at `begin_step` to `final` at `end_step`, then constant.

  `cubic` is Zhu and Gupta (2018): s_f + (s_0 - s_f)(1 - p)^3 with p the progress in [0, 1].
  """
  if kind not in SPARSITY_SCHEDULES:
    raise ValueError(f"--sp_schedule must be one of {SPARSITY_SCHEDULES}, got {kind!r}")
  if kind == "constant":
    return optax.constant_schedule(final)
  span = max(int(end_step) - int(begin_step), 1)

  def schedule(step):
    p = _progress(step, begin_step, span)
    if kind == "linear":
      ramp = p
    elif kind == "cosine":
      ramp = (1.0 - jnp.cos(jnp.pi * p)) / 2.0
    else:
      ramp = 1.0 - (1.0 - p) ** 3
    return initial + (final - initial) * ramp

  return schedule


def penalty_pull(lr_fn: optax.Schedule, penalty_fn: optax.Schedule, total_steps: int,
                 momentum: float = 0.0) -> float:
  """P = sum_t lr(t) lambda(t) / (1 - momentum), in float64: by how much SGD's proximal term
  alone would shrink x - (z - u) over the run, ~exp(-P) (heavy-ball momentum's steady-state
  gain is 1 / (1 - momentum)). The loss pushes back, so the constraint gap closes only when P
  is large: BUILD_NOTES.md, "How strong the penalty must be"."""
  steps = jnp.arange(max(int(total_steps), 0))
  lr = np.broadcast_to(np.asarray(lr_fn(steps), np.float64), steps.shape)
  lam = np.broadcast_to(np.asarray(penalty_fn(steps), np.float64), steps.shape)
  return float(np.sum(lr * lam) / (1.0 - momentum))
