"""Hessian sharpness of a loss over params: Hessian-vector products, top eigenvalue, trace.

Everything takes a `loss_fn(params, batch_stats, batch) -> scalar`; the caller (the task)
owns the model, the labels and the padding weights. Vectors are pytrees shaped like params;
norms and inner products run in float32 over the whole tree.

Two ways to run the estimators:
  * fused: `max_eigenvalue`, `hessian_trace` and `make_sharpness_fn` are single jittable
    functions (loops are `lax.fori_loop`), to be jitted with the train step's shardings;
  * stepped: `HessianProbe.measure` runs one jitted Hessian-vector product per call, so a run
    can budget it against measured time, log its progress and stop it between products.
    With the same key it uses the same probe vectors as the fused functions.
"""

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

LossFn = Callable[[Any, Any, Any], jax.Array]  # loss_fn(params, batch_stats, batch) -> scalar
HvpFn = Callable[[Any, Any, Any, Any], Any]  # hvp(params, batch_stats, batch, v) -> H v

MAX_EIG = "sharpness/hessian_max_eig"
TRACE = "sharpness/hessian_trace"


def make_hvp(loss_fn: LossFn) -> HvpFn:
  """hvp(params, batch_stats, batch, v): the Hessian of loss_fn over params times v."""

  def hvp(params, batch_stats, batch, v):
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch_stats, batch)
    return jax.jvp(grad_fn, (params,), (v,))[1]  # forward-over-reverse

  return hvp


def tree_vdot(a, b) -> jax.Array:
  """<a, b> over all leaves, in float32."""
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b))
  return sum(leaves, jnp.zeros((), jnp.float32))


def _tree_scale(tree, s):
  return jax.tree.map(lambda x: (x.astype(jnp.float32) * s).astype(x.dtype), tree)


def _random_like(key, tree, sampler):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([sampler(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _start_vector(params, key):
  """The unit Gaussian vector power iteration starts from."""
  v = _random_like(key, params, jax.random.normal)
  return _tree_scale(v, jax.lax.rsqrt(tree_vdot(v, v)))


def _sign_vector(params, key, i):
  """Hutchinson's i-th Rademacher vector."""
  return _random_like(jax.random.fold_in(key, i), params, jax.random.rademacher)


def _hvp_step(hvp_fn: HvpFn, params, batch_stats, batch, v):
  """(H v / |H v|, v^T H v): a power-iteration step, and Hutchinson's term for sign vectors."""
  hv = hvp_fn(params, batch_stats, batch, v)
  norm = jnp.sqrt(tree_vdot(hv, hv))
  return _tree_scale(hv, 1.0 / jnp.maximum(norm, 1e-30)), tree_vdot(v, hv)


def max_eigenvalue(loss_fn: LossFn, params, batch_stats, batch, key,
                   num_iters: int = 20) -> jax.Array:
  """Power iteration: the Rayleigh quotient of the eigenvalue largest in magnitude (signed).

  Uses `num_iters` Hessian-vector products; the returned value is v^T H v for the unit
  vector after `num_iters - 1` power steps.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  hvp = make_hvp(loss_fn)
  body = lambda _, carry: _hvp_step(hvp, params, batch_stats, batch, carry[0])
  init = (_start_vector(params, key), jnp.zeros((), jnp.float32))
  return jax.lax.fori_loop(0, num_iters, body, init)[1]


def hessian_trace(loss_fn: LossFn, params, batch_stats, batch, key,
                  num_samples: int = 10) -> jax.Array:
  """Hutchinson's estimator: the mean of v^T H v over Rademacher vectors v."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  hvp = make_hvp(loss_fn)

  def body(i, total):
    v = _sign_vector(params, key, i)
    return total + _hvp_step(hvp, params, batch_stats, batch, v)[1]

  total = jax.lax.fori_loop(0, num_samples, body, jnp.zeros((), jnp.float32))
  return total / num_samples


def make_sharpness_fn(loss_fn: LossFn, num_iters: int = 20, num_samples: int = 10) -> Callable:
  """sharpness(params, batch_stats, batch, key) -> {MAX_EIG: ..., TRACE: ...}, fused.

  One pure function of explicit state, to be jitted with the train step's shardings.
  A count of 0 skips that estimator.
  """

  def sharpness(params, batch_stats, batch, key):
    eig_key, trace_key = jax.random.split(key)
    out = {}
    if num_iters:
      out[MAX_EIG] = max_eigenvalue(loss_fn, params, batch_stats, batch, eig_key, num_iters)
    if num_samples:
      out[TRACE] = hessian_trace(loss_fn, params, batch_stats, batch, trace_key, num_samples)
    return out

  return sharpness


def fit_counts(num_iters: int, num_samples: int, affordable: int) -> Optional[tuple[int, int]]:
  """(power iterations, Hutchinson samples) within `affordable` Hessian-vector products.

  All of them when they fit; else both cut in proportion, keeping at least 2 iterations (one
  power step) and 1 sample of the estimators asked for; None when even that does not fit.
  """
  if num_iters + num_samples <= affordable:
    return num_iters, num_samples
  share = affordable / (num_iters + num_samples)
  iters = max(min(num_iters, 2), math.floor(num_iters * share))
  samples = max(min(num_samples, 1), math.floor(num_samples * share))
  return (iters, samples) if iters + samples <= affordable else None


@dataclasses.dataclass(frozen=True)
class Measurement:
  """What `HessianProbe.measure` did.

  values: {MAX_EIG: float, TRACE: float}, only the estimators that ran; empty when skipped
    or interrupted (partial results are discarded).
  hvps: Hessian-vector products run, the timing one included.
  seconds: wall time, compilation included.
  status: "complete" (as configured), "reduced" (fewer products, to fit the budget),
    "skipped" (not even the minimum fits) or "interrupted" (a stop request).
  note: why it was reduced, skipped or interrupted, as logged; "" when complete.
  """
  values: dict[str, float]
  hvps: int
  seconds: float
  status: str
  note: str = ""


# Measurements predicted to take longer than this log their start, progress and duration.
SLOW_SECONDS = 5.0
PROGRESS_SECONDS = 10.0


class _Log:
  """The measurement's log lines, and when it is slow enough to write them."""

  def __init__(self, label: str, clock: Callable[[], float]):
    self.prefix = f"sharpness {label}" if label else "sharpness"
    self.clock = clock
    self.start = self.last = clock()
    self.verbose = False

  def elapsed(self) -> float:
    return self.clock() - self.start

  def info(self, msg: str, *args) -> None:
    logging.info(f"{self.prefix}: {msg}", *args)

  def started(self, iters: int, samples: int, per_hvp: float, budget: Optional[float],
              note: str) -> None:
    """Logs the plan when the whole measurement is predicted to be slow."""
    expected = self.elapsed() + per_hvp * (iters + samples - 1)
    self.verbose = expected > SLOW_SECONDS
    if self.verbose:
      budget_text = "no budget" if budget is None else f"budget {budget:.1f} s"
      self.info("measuring %d power iterations + %d Hutchinson samples, %.1f s per "
                "Hessian-vector product, ~%.0f s expected (%s; %.1f s spent compiling and "
                "timing)%s", iters, samples, per_hvp, expected, budget_text, self.elapsed(),
                f"; {note}" if note else "")
      self.last = self.clock()

  def progress(self, done: int, total: int) -> None:
    if self.verbose and self.clock() - self.last >= PROGRESS_SECONDS:
      self.info("%d/%d Hessian-vector products, %.0f s", done, total, self.elapsed())
      self.last = self.clock()

  def finished(self, hvps: int) -> None:
    if self.verbose or self.elapsed() > SLOW_SECONDS:
      self.info("done in %.1f s (%d Hessian-vector products)", self.elapsed(), hvps)


@dataclasses.dataclass(frozen=True)
class _Functions:
  """The jitted pieces of one measurement, for one set of shapes and shardings."""
  step: Callable  # (params, batch_stats, batch, v) -> (H v / |H v|, v^T H v), compiled
  start: Callable  # (params, key) -> unit Gaussian vector
  sign: Callable  # (params, key, i) -> i-th Rademacher vector


class HessianProbe:
  """Top Hessian eigenvalue (power iteration) and trace (Hutchinson) of a loss at given params.

  Runs one jitted Hessian-vector product per call, so a measurement can be budgeted, logged
  and interrupted. Compiled once per shapes and shardings of (params, batch_stats, batch), so
  measuring x and then Proj(x) compiles once. With `in_shardings=(params, batch_stats, batch)`
  shardings (the train state's), probe vectors are sharded like the params; without, they
  follow the arguments' shardings.

    probe = HessianProbe(loss_fn, num_iters=20, num_samples=10, in_shardings=shardings)
    m = probe.measure(params, batch_stats, batch, key, budget_seconds=6.0,
                      should_stop=stop_requested, label="x")
    writer.scalars(step, m.values)
  """

  def __init__(self, loss_fn: LossFn, *, num_iters: int, num_samples: int,
               in_shardings: Optional[tuple] = None,
               clock: Callable[[], float] = time.perf_counter,
               agree: Callable[[np.ndarray], np.ndarray] = lambda timings: timings):
    if num_iters < 0 or num_samples < 0:
      raise ValueError(f"counts must be >= 0, got {num_iters} and {num_samples}")
    self.num_iters, self.num_samples = num_iters, num_samples
    self.in_shardings = in_shardings
    self.clock = clock
    # Several processes must run the same number of products (each one is a collective):
    # `agree` makes their timings the same (e.g. process 0's, broadcast) before fitting.
    self.agree = agree
    self._hvp = make_hvp(loss_fn)
    self._compiled: dict = {}

  def measure(self, params, batch_stats, batch, key, *, budget_seconds: Optional[float] = None,
              hvp_seconds_estimate: Optional[float] = None,
              should_stop: Callable[[], bool] = lambda: False, label: str = "") -> Measurement:
    """Measures at (params, batch_stats, batch) within `budget_seconds` (None: no limit).

    Compiles (cost counted against the budget), times the first Hessian-vector product, then
    cuts both counts in proportion to fit the budget (`fit_counts`) or skips. A caller's
    `hvp_seconds_estimate` (e.g. from the measured step time) skips before compiling when
    even the minimum would not fit. `should_stop()` is checked before every product; a
    product already running is not interrupted. `label` names the measurement in the logs.
    """
    log = _Log(label, self.clock)
    minimum = min(self.num_iters, 2) + min(self.num_samples, 1)
    if minimum == 0:
      return Measurement({}, 0, 0.0, "complete")
    if (budget_seconds is not None and hvp_seconds_estimate is not None
        and minimum * hvp_seconds_estimate > budget_seconds):
      return self._skip(log, 0, f"one Hessian-vector product takes ~{hvp_seconds_estimate:.1f}"
                        f" s (estimated), budget {budget_seconds:.1f} s")
    if should_stop():  # before compiling, which cannot be interrupted
      return self._interrupted(log, 0)
    args = jax.tree.map(jnp.asarray, (params, batch_stats, batch))  # no-op on jax Arrays
    params = args[0]
    fns = self._functions(*args, key)
    eig_key, trace_key = jax.random.split(key)
    iters, samples = self.num_iters, self.num_samples
    v, eig, total, note, n = None, None, np.float32(0), "", 0
    while n < iters + samples:
      if should_stop():
        return self._interrupted(log, n)
      if n < iters:  # power iteration, then Hutchinson
        v, eig, seconds = self._run(fns, args, fns.start(params, eig_key) if n == 0 else v)
      else:
        _, quad, seconds = self._run(fns, args,
                                     fns.sign(params, trace_key, np.int32(n - iters)))
        total += quad
      n += 1
      if n == 1:  # the first product, timed after compiling: fit the rest to the budget
        elapsed, seconds = (float(t) for t in self.agree(np.array([log.elapsed(), seconds])))
        counts = self._fit(elapsed, seconds, budget_seconds)
        if counts is None:
          return self._skip(log, n, f"one Hessian-vector product takes {seconds:.1f} s, "
                            f"budget {budget_seconds:.1f} s")
        if counts != (iters, samples):
          note = (f"cut from {iters} + {samples} to {counts[0]} + {counts[1]} to fit the "
                  f"budget of {budget_seconds:.1f} s")
        iters, samples = counts
        log.started(iters, samples, seconds, budget_seconds, note)
      log.progress(n, iters + samples)
    values = {MAX_EIG: float(eig)} if iters else {}
    if samples:
      values[TRACE] = float(total / np.float32(samples))
    log.finished(n)
    return Measurement(values, n, log.elapsed(), "reduced" if note else "complete", note)

  def _fit(self, elapsed: float, per_hvp: float,
           budget: Optional[float]) -> Optional[tuple[int, int]]:
    if budget is None or per_hvp <= 0:
      return self.num_iters, self.num_samples
    affordable = 1 + math.floor((budget - elapsed) / per_hvp)  # the timed product counts
    return fit_counts(self.num_iters, self.num_samples, affordable)

  def _run(self, fns, args, v):
    """One Hessian-vector product, to completion: (H v / |H v|, v^T H v, seconds)."""
    start = self.clock()
    next_v, quad = jax.block_until_ready(fns.step(*args, v))
    return next_v, np.float32(quad), self.clock() - start

  def _skip(self, log: _Log, hvps: int, reason: str) -> Measurement:
    log.info("skipped (%s)", reason)
    return Measurement({}, hvps, log.elapsed(), "skipped", reason)

  def _interrupted(self, log: _Log, hvps: int) -> Measurement:
    note = f"interrupted by a stop request after {hvps} Hessian-vector products"
    log.info("%s, %.1f s", note, log.elapsed())
    return Measurement({}, hvps, log.elapsed(), "interrupted", note)

  def _functions(self, params, batch_stats, batch, key) -> _Functions:
    """The compiled product and the vector makers for these shapes and shardings (cached)."""
    leaves, treedef = jax.tree.flatten((params, batch_stats, batch))
    cache_key = (treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves),
                 jax.typeof(key))
    if cache_key not in self._compiled:
      self._compiled[cache_key] = self._compile(params, batch_stats, batch, key)
    return self._compiled[cache_key]

  def _compile(self, params, batch_stats, batch, key) -> _Functions:
    shardings = self.in_shardings or jax.tree.map(
        lambda x: x.sharding, (params, batch_stats, batch))
    vec = shardings[0]  # probe vectors are sharded like the params
    step = jax.jit(lambda p, s, b, v: _hvp_step(self._hvp, p, s, b, v),
                   in_shardings=(*shardings, vec), out_shardings=(vec, None))
    start = jax.jit(_start_vector, in_shardings=(vec, None), out_shardings=vec)
    sign = jax.jit(_sign_vector, in_shardings=(vec, None, None), out_shardings=vec)
    # Compiled ahead of time so that the first product's timing excludes compilation and no
    # compilation happens after the budget is fitted.
    return _Functions(step.lower(params, batch_stats, batch, params).compile(),
                      start.lower(params, key).compile(),
                      sign.lower(params, key, np.int32(0)).compile())
