"""Builds the full optimizer of a sparsifier: base optimizer plus SAFE/ADMM/GMP/IHT/magnitude."""

import dataclasses
from typing import Optional

import optax

from safe_dist.sparsity import baselines
from safe_dist.sparsity import schedules
from safe_dist.sparsity.admm import admm
from safe_dist.sparsity.sam import sam_gradient
from safe_dist.sparsity.projection import Projection, prunable_tree

SPARSIFIERS = ("safe", "safe_plus", "admm", "gmp", "iht", "magnitude", "none")
PENALIZED = ("safe", "safe_plus", "admm")  # the augmented-Lagrangian methods: x, z and u


@dataclasses.dataclass(frozen=True)
class SparsifierConfig:
  """What to prune, how much, and with which method (reference flag in brackets).

  name [--sparsifier]: one of SPARSIFIERS. sparsity [--sp], scope [--sp_scope] (None: "nm"
  if n_m is given, else "global"), n_m [--nm].
  SAFE/ADMM: lam [--lambda], lambda_schedule (None: the method's default, see
  `resolved_lambda_schedule`), dual_update_interval (K), rho (SAM radius, SAFE),
  sam_group_size [--sam_group_size] (m-sharpness: the SAM perturbation per group of m
  examples; 0: one for the whole global batch).
  penalty_pull [--penalty_pull]: when set, lambda is not `lam` but the scale that gives this
  total pull P = sum_t lr(t) lambda(t) / (1 - momentum) under SGD over the run
  (`resolve_penalty_pull`, applied when the run is set up): one P carries over budgets,
  schedules and methods where one lambda does not.
  SAFE+: importance [--importance] "activation" (input norms, Wanda-style) or "grad_sq".
  GMP/IHT: sp_schedule from `begin_fraction` to `end_fraction` of training, GMP every
  `prune_interval` steps. magnitude: prune once at `prune_fraction` of training, then fine-tune.
  """
  name: str = "safe"
  sparsity: float = 0.95
  scope: Optional[str] = None
  n_m: Optional[tuple[int, int]] = None
  lam: float = 1e-4
  lambda_schedule: Optional[str] = None
  dual_update_interval: int = 32
  rho: float = 0.1
  sam_group_size: int = 0
  importance: str = "activation"
  sp_schedule: str = "cubic"
  begin_fraction: float = 0.0
  end_fraction: float = 0.75
  prune_interval: int = 100
  prune_fraction: float = 0.5
  penalty_pull: Optional[float] = None

  def __post_init__(self):
    if self.name not in SPARSIFIERS:
      raise ValueError(f"--sparsifier must be one of {SPARSIFIERS}, got {self.name!r}")
    if self.penalty_pull is not None:
      if not self.penalized:
        raise ValueError(f"--penalty_pull sets the lambda of {PENALIZED}; --sparsifier "
                         f"{self.name} has no penalty (leave --penalty_pull unset)")
      if not self.penalty_pull > 0:
        raise ValueError(f"--penalty_pull must be > 0, got {self.penalty_pull}")
    if not 0.0 <= self.begin_fraction <= self.end_fraction <= 1.0:
      raise ValueError("sparsifier.begin_fraction <= sparsifier.end_fraction must lie in [0, 1]")
    # Every other value is checked once, by the part that uses it (its error names the flag):
    # building all parts here reports a bad value before training starts, whatever the method.
    projection = self.projection  # --sp, --sp_scope, --nm
    admm(projection, self.penalty(1), self.dual_update_interval, self.importance)
    sam_gradient(self.rho)
    if self.sam_group_size < 0:
      raise ValueError(f"--sam_group_size must be >= 0 (0: the whole batch), got "
                       f"{self.sam_group_size}")
    if self.sam_group_size and not self.uses_sam:
      raise ValueError(f"--sam_group_size {self.sam_group_size} needs a SAM step (--sparsifier "
                       f"safe or safe_plus with --rho > 0); got --sparsifier {self.name} with "
                       f"--rho {self.rho}")
    baselines.gmp(projection, self.sparsity_schedule(1), self.prune_interval, 1)

  @property
  def penalized(self) -> bool:
    """An augmented-Lagrangian method (SAFE, SAFE+, ADMM): it has a penalty lambda."""
    return self.name in PENALIZED

  @property
  def uses_sam(self) -> bool:
    """The w-step is a SAM step (SAFE and SAFE+ with rho > 0)."""
    return self.name in ("safe", "safe_plus") and self.rho > 0

  @property
  def projection(self) -> Projection:
    return Projection(self.sparsity, self.scope, self.n_m)

  @property
  def resolved_lambda_schedule(self) -> str:
    """lambda_schedule, or when None the method's default: constant for ADMM (the official
    ADMM ignores the schedule), cosine for SAFE and SAFE+ (the reference runs)."""
    if self.lambda_schedule is not None:
      return self.lambda_schedule
    return "constant" if self.name == "admm" else "cosine"

  def penalty(self, total_steps: int) -> optax.Schedule:
    """lambda(t) of SAFE/SAFE+/ADMM."""
    return schedules.penalty_schedule(self.lam, self.resolved_lambda_schedule, total_steps)

  def penalty_pull_of(self, lr_fn: optax.Schedule, total_steps: int,
                      momentum: float) -> Optional[float]:
    """`schedules.penalty_pull` of this penalty under SGD with `lr_fn` and `momentum`; None for
    the methods without one."""
    if not self.penalized:
      return None
    return schedules.penalty_pull(lr_fn, self.penalty(total_steps), total_steps, momentum)

  def resolve_penalty_pull(self, lr_fn: optax.Schedule, total_steps: int,
                           momentum: float) -> "SparsifierConfig":
    """This config with `lam` set so that its pull under SGD is `penalty_pull` (and
    penalty_pull cleared); itself when penalty_pull is unset. P is linear in lambda."""
    if self.penalty_pull is None:
      return self
    unit = dataclasses.replace(self, lam=1.0, penalty_pull=None)
    pull = unit.penalty_pull_of(lr_fn, total_steps, momentum)
    if not pull > 0:
      raise ValueError(f"--penalty_pull {self.penalty_pull}: the learning rate and lambda "
                       f"schedules over {total_steps} steps give no pull to scale")
    return dataclasses.replace(unit, lam=self.penalty_pull / pull)

  def sparsity_schedule(self, total_steps: int) -> optax.Schedule:
    """s(t) of GMP and IHT: from 0 at `begin_fraction` to `sparsity` at `end_fraction`."""
    begin, end = self.ramp_steps(total_steps)
    return schedules.sparsity_schedule(self.sparsity, self.sp_schedule, begin, end)

  def ramp_steps(self, total_steps: int) -> tuple[int, int]:
    """(begin, end) steps of the GMP/IHT sparsity ramp."""
    return int(self.begin_fraction * total_steps), int(self.end_fraction * total_steps)

  @property
  def needs_input_norms(self) -> bool:
    """The train step must pass `input_sq_norms=` (SAFE+ with activation importance)."""
    return self.name == "safe_plus" and self.importance == "activation"

  @property
  def target_sparsity(self) -> float:
    return 0.0 if self.name == "none" else self.projection.target_sparsity


def make_optimizer(cfg: SparsifierConfig, base: optax.GradientTransformation,
                   total_steps: int, projection: Optional[Projection] = None
                   ) -> optax.GradientTransformationExtraArgs:
  """base optimizer wrapped by the sparsifier; update(..., value_and_grad_fn=f) for SAFE.

  projection: `cfg.projection` by default; pass one carrying the kernels' shardings
  (`prunable_shardings`) to run every projection per shard.
  """
  projection = cfg.projection if projection is None else projection
  if cfg.name == "none":
    return optax.with_extra_args_support(base)
  if cfg.penalized:
    if cfg.penalty_pull is not None:
      raise ValueError("sparsifier.penalty_pull must be resolved to a lambda "
                       "(SparsifierConfig.resolve_penalty_pull) before the optimizer is built")
    importance = cfg.importance if cfg.name == "safe_plus" else None
    parts = [optax.masked(admm(projection, cfg.penalty(total_steps), cfg.dual_update_interval,
                               importance), prunable_tree), base]
    if cfg.uses_sam:  # SAFE's w-step is a SAM step
      parts.insert(0, sam_gradient(cfg.rho))
    return optax.chain(*parts)
  sparsity_fn = cfg.sparsity_schedule(total_steps)
  if cfg.name == "iht":
    sparsifier = baselines.iht(projection, sparsity_fn)
  elif cfg.name == "gmp":
    sparsifier = baselines.gmp(projection, sparsity_fn, cfg.prune_interval,
                               cfg.ramp_steps(total_steps)[1])
  else:
    sparsifier = baselines.one_shot_magnitude(projection, int(cfg.prune_fraction * total_steps))
  return optax.chain(base, optax.masked(sparsifier, prunable_tree))
