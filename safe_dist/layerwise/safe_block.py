"""SAFE and SAFE+ on one transformer block, as the official language-model code runs them.

The block's linear kernels and RMSNorm scales are trained so that the block reproduces the
dense block's outputs (MSE over batch, sequence and hidden), with the sparsity package's
SAFE optimizer (SAM, then the ADMM penalty and dual updates on the kernels, then Adam), and
finally projected, each kernel on its own (SPEC.md, "Language models"). The whole
optimisation of a block is one jitted loop over device-resident calibration data.

One deliberate difference from the official code: the proximal term lambda (w - z + u) is
taken at the unperturbed w, as Algorithm 1 writes it (the official code takes it at w + e).
As the sparsity package does it: SAM's norm is one norm over all trainable block
parameters (norm scales included), and SAFE+'s z0 = Proj(w0) ranks |w0| (its importance
enters from the first dual update on).

Example:
  >>> block = DecoderBlock(config)
  >>> prune = make_block_pruner(lambda p, x: block.apply({"params": p}, x), SafeBlockConfig())
  >>> pruned, stats = prune(params, inputs, targets, jax.random.PRNGKey(0))
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from safe_dist import optim, sharding
from safe_dist.sparsity import (Projection, SparsifierConfig, importance, make_optimizer,
                                prunable_shardings, prunable_tree)

METHODS = ("safe", "safe_plus")


@dataclasses.dataclass(frozen=True)
class SafeBlockConfig:
  """SAFE on one block; the official prune_lm flag in brackets.

  method: "safe" (Proj by |w|) or "safe_plus" (by |w_ij| sqrt(s_j), s_j the mean squared
  input j of the kernel) [--activation]; sparsity [--sparsity_ratio] per kernel, or n_m
  (N, M) along the input [--sparsity_type N:M]; lam [--lmda] constant; rho [--rho];
  interval [--interval] steps between dual updates; Adam with learning_rate
  [--learning_rate], linear warm-up over warmup_epochs [--warmup_epochs] then linear decay
  to 0, betas [--beta1 --beta2], no weight decay; epochs [--epochs] of batch_size
  [--batch_size] samples, reshuffled every epoch.
  """
  method: str = "safe"
  sparsity: float = 0.5
  n_m: Optional[tuple[int, int]] = None
  lam: float = 1e-3
  rho: float = 2e-4
  interval: int = 32
  learning_rate: float = 2e-4
  epochs: int = 30
  warmup_epochs: float = 2.0
  batch_size: int = 8
  beta1: float = 0.9
  beta2: float = 0.95

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS} (SAFE+ is --activation), "
                       f"got {self.method!r}")
    checks = (("--lmda", "lam", lambda v: v >= 0, ">= 0"),
              ("--rho", "rho", lambda v: v >= 0, ">= 0"),
              ("--interval", "interval", lambda v: v >= 1, ">= 1"),
              ("--learning_rate", "learning_rate", lambda v: v > 0, "> 0"),
              ("--epochs", "epochs", lambda v: v >= 1, ">= 1"),
              ("--warmup_epochs", "warmup_epochs", lambda v: 0 <= v <= self.epochs,
               "in [0, --epochs]"),
              ("--batch_size", "batch_size", lambda v: v >= 1, ">= 1"),
              ("--beta1", "beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
              ("--beta2", "beta2", lambda v: 0 <= v < 1, "in [0, 1)"))
    for flag, field, ok, want in checks:
      if not ok(getattr(self, field)):
        raise ValueError(f"{flag} must be {want}, got {getattr(self, field)}")
    if self.n_m is None and not 0 <= self.sparsity < 1:
      raise ValueError(f"--sparsity_ratio must be in [0, 1), got {self.sparsity}")
    if self.n_m is not None and not 0 < self.n_m[0] < self.n_m[1]:
      raise ValueError(f"--sparsity_type N:M needs 0 < N < M, got {self.n_m}")

  @property
  def sparsifier(self) -> SparsifierConfig:
    scope = "nm" if self.n_m else "layerwise"  # every kernel on its own
    return SparsifierConfig(name=self.method, sparsity=self.sparsity, scope=scope, n_m=self.n_m,
                            lam=self.lam, lambda_schedule="constant",
                            dual_update_interval=self.interval, rho=self.rho,
                            importance="activation")

  @property
  def base_optimizer(self) -> optim.OptimizerConfig:
    return optim.OptimizerConfig(name="adam", lr=self.learning_rate, lr_schedule="linear",
                                 warmup_epochs=self.warmup_epochs, weight_decay=0.0,
                                 b1=self.beta1, b2=self.beta2)

  def steps_per_epoch(self, nsamples: int) -> int:
    if nsamples % self.batch_size:
      raise ValueError(f"--nsamples ({nsamples}) must be a multiple of --batch_size "
                       f"({self.batch_size})")
    return nsamples // self.batch_size

  def optimizer(self, nsamples: int, projection: Projection
                ) -> optax.GradientTransformationExtraArgs:
    """SAM -> ADMM on the kernels -> Adam, over `epochs` epochs of `nsamples` samples."""
    steps_per_epoch = self.steps_per_epoch(nsamples)
    total = self.epochs * steps_per_epoch
    lr = optim.learning_rate_schedule(self.base_optimizer, steps_per_epoch, total)
    return make_optimizer(self.sparsifier, optim.make_base_optimizer(self.base_optimizer, lr),
                          total, projection=projection)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _path_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)


def kernel_input_norms(params, input_sq_norms) -> Any:
  """A tree like `params`: each kernel's mean squared inputs shaped (in, 1), 0 elsewhere.

  input_sq_norms: any tree that holds, at each kernel's path, that kernel's s_j shaped (in,)
  or (in, 1) (e.g. from `importance.input_sq_norms`); other entries are ignored.
  """
  given = {_path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(input_sq_norms)[0]}

  def per_leaf(path, p, prunable):
    if not prunable:
      return jnp.zeros([], jnp.float32)
    norms = given.get(_path_names(path))
    if norms is None or norms.size != p.shape[0]:
      raise ValueError(f"SAFE+ needs input_sq_norms of {p.shape[0]} inputs at "
                       f"{'/'.join(map(str, _path_names(path)))}")
    return jnp.reshape(norms, (p.shape[0], 1)).astype(jnp.float32)
  return jax.tree_util.tree_map_with_path(per_leaf, params, prunable_tree(params))


def project(projection: Projection, params, norms=None):
  """Proj of every kernel: by |w| (SAFE) or by sqrt(s_j) |w_ij| (SAFE+, `norms` from
  `kernel_input_norms`); the norm scales unchanged."""
  if norms is None:
    return projection.project_params(params)
  flags = prunable_tree(params)
  only = lambda tree: jax.tree.map(lambda x, f: x if f else optax.MaskedNode(), tree, flags)
  masks = projection.masks(importance.scores(only(params), only(norms)))
  return jax.tree.map(lambda p, m: p if _is_masked(m) else p * m.astype(p.dtype),
                      params, masks, is_leaf=_is_masked)


def make_block_pruner(block_apply: Callable, cfg: SafeBlockConfig, *,
                      param_shardings: Any = None, data_sharding: Any = None,
                      finish: bool = True) -> Callable:
  """prune(params, inputs, targets, key, input_sq_norms=None) -> (params, stats), jitted.

  One function for all blocks of a model (they share shapes: one compilation).
  block_apply(params, x) -> y, pure, for x of shape (batch, seqlen, hidden).
  inputs, targets: (nsamples, seqlen, hidden), the block's calibration inputs and the dense
  block's outputs on them. key: the shuffles; epoch e visits the samples in the order
  `jax.random.permutation(jax.random.fold_in(key, e), nsamples)`, `batch_size` at a time.
  input_sq_norms (SAFE+ only): see `kernel_input_norms`; the same at every step, so SAFE+'s
  running importance equals them.
  param_shardings: NamedShardings like `params` (the kernels' projections then run per
  shard); data_sharding: of inputs and targets, batch over the data axes.
  finish: False returns the trained weights before the final projection (tests, diagnostics).
  From dense targets (loss 0) the first gradients are rounding noise that Adam scales up:
  runs that round differently (another mesh) agree only to ~1e-3 in the weights.
  stats: "loss" (steps,) the batch MSE at every step (before its update); "mse_trained" and
  (finish) "mse" the MSE over all calibration samples before and after the projection.
  """
  projection = cfg.sparsifier.projection
  mesh = None if param_shardings is None else jax.tree.leaves(param_shardings)[0].mesh
  constrain = lambda x, s: x if s is None else lax.with_sharding_constraint(x, s)

  def loss_fn(params, x, y):
    out = block_apply(params, x)
    return jnp.mean(jnp.square(out.astype(jnp.float32) - y.astype(jnp.float32)))

  def prune(params, inputs, targets, key, input_sq_norms=None):
    nsamples, batch_size = inputs.shape[0], cfg.batch_size
    steps_per_epoch = cfg.steps_per_epoch(nsamples)
    steps = cfg.epochs * steps_per_epoch
    if (input_sq_norms is None) != (cfg.method == "safe"):
      raise ValueError("input_sq_norms must be given for SAFE+ (method 'safe_plus') only")
    norms = None if input_sq_norms is None else kernel_input_norms(params, input_sq_norms)
    extra = {} if norms is None else {"input_sq_norms": norms}
    proj = projection if mesh is None else dataclasses.replace(
        projection, shardings=prunable_shardings(params, param_shardings))
    tx = cfg.optimizer(nsamples, proj)
    state_shardings = None if mesh is None else sharding.shardings_like_params(
        jax.eval_shape(tx.init, params), params, param_shardings, mesh)

    def batch(indices):
      # a gather of batch_size rows: only they move between devices, not the data set
      return tuple(constrain(jnp.take(a, indices, axis=0), data_sharding)
                   for a in (inputs, targets))

    orders = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), nsamples))(
        jnp.arange(cfg.epochs))

    def step(t, carry):
      params, opt_state, losses = carry
      order = orders[t // steps_per_epoch]
      x, y = batch(lax.dynamic_slice_in_dim(order, t % steps_per_epoch * batch_size,
                                            batch_size))
      value_and_grad = lambda p: jax.value_and_grad(loss_fn)(p, x, y)
      loss, grads = value_and_grad(params)
      updates, opt_state = tx.update(grads, opt_state, params, value_and_grad_fn=value_and_grad,
                                     **extra)
      params = constrain(optax.apply_updates(params, updates), param_shardings)
      return params, constrain(opt_state, state_shardings), losses.at[t].set(loss)

    def dataset_mse(params):
      def add(i, total):
        indices = i * batch_size + jnp.arange(batch_size)
        return total + loss_fn(params, *batch(indices))
      return lax.fori_loop(0, steps_per_epoch, add, jnp.zeros([], jnp.float32)) / steps_per_epoch

    opt_state = constrain(tx.init(params), state_shardings)
    params, _, losses = lax.fori_loop(0, steps, step,
                                      (params, opt_state, jnp.zeros([steps], jnp.float32)))
    stats = {"loss": losses, "mse_trained": dataset_mse(params)}
    if finish:
      params = constrain(project(proj, params, norms), param_shardings)
      stats["mse"] = dataset_mse(params)
    return params, stats

  if param_shardings is None and data_sharding is None:
    return jax.jit(prune)
  jitted = jax.jit(prune, out_shardings=(param_shardings, None),
                   in_shardings=(param_shardings, data_sharding, data_sharding, None, None))
  return lambda params, inputs, targets, key, input_sq_norms=None: jitted(
      params, inputs, targets, key, input_sq_norms)


def prune_block(block_apply: Callable, params, inputs, targets, cfg: SafeBlockConfig, key,
                input_sq_norms=None, param_shardings=None, data_sharding=None):
  """One block pruned by SAFE/SAFE+: (pruned params, stats); see `make_block_pruner` (build
  the pruner once to prune many blocks with one compilation)."""
  prune = make_block_pruner(block_apply, cfg, param_shardings=param_shardings,
                            data_sharding=data_sharding)
  return prune(params, inputs, targets, key, input_sq_norms)
