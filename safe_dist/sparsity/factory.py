"""Builds the full optimizer of a sparsifier: base optimizer plus SAFE/ADMM/GMP/IHT/magnitude."""

import dataclasses
from typing import Any, Optional

import optax

from safe_dist.sparsity import baselines
from safe_dist.sparsity import schedules
from safe_dist.sparsity.admm import admm
from safe_dist.sparsity.importance import IMPORTANCE_SOURCES
from safe_dist.sparsity.sam import sam_gradient
from safe_dist.sparsity.projection import Projection, prunable_tree

SPARSIFIERS = ("safe", "safe_plus", "admm", "gmp", "iht", "magnitude", "none")


@dataclasses.dataclass(frozen=True)
class SparsifierConfig:
  """What to prune, how much, and with which method (reference flag in brackets).

  name [--sparsifier]: one of SPARSIFIERS. sparsity [--sp], scope [--sp_scope], n_m [--nm].
  SAFE/ADMM: lam [--lambda], lambda_schedule, dual_update_interval (K), rho (SAM radius, SAFE).
  SAFE+: importance [--importance] "activation" (input norms, Wanda-style) or "grad_sq".
  GMP/IHT: sp_schedule from `begin_fraction` to `end_fraction` of training, GMP every
  `prune_interval` steps. magnitude: prune once at `prune_fraction` of training, then fine-tune.
  """
  name: str = "safe"
  sparsity: float = 0.95
  scope: str = "global"
  n_m: Optional[tuple[int, int]] = None
  lam: float = 1e-4
  lambda_schedule: str = "cosine"
  dual_update_interval: int = 32
  rho: float = 0.1
  importance: str = "activation"
  sp_schedule: str = "cubic"
  begin_fraction: float = 0.0
  end_fraction: float = 0.75
  prune_interval: int = 100
  prune_fraction: float = 0.5

  def __post_init__(self):
    if self.name not in SPARSIFIERS:
      raise ValueError(f"--sparsifier must be one of {SPARSIFIERS}, got {self.name!r}")
    self.projection  # validates --sp, --sp_scope, --nm
    if self.lambda_schedule not in schedules.LAMBDA_SCHEDULES:
      raise ValueError(f"--lambda_schedule must be one of {schedules.LAMBDA_SCHEDULES}, "
                       f"got {self.lambda_schedule!r}")
    if self.sp_schedule not in schedules.SPARSITY_SCHEDULES:
      raise ValueError(f"--sp_schedule must be one of {schedules.SPARSITY_SCHEDULES}, "
                       f"got {self.sp_schedule!r}")
    if self.dual_update_interval < 1:
      raise ValueError(f"--dual_update_interval must be >= 1, got {self.dual_update_interval}")
    if self.importance not in IMPORTANCE_SOURCES:
      raise ValueError(f"--importance must be one of {IMPORTANCE_SOURCES}, "
                       f"got {self.importance!r}")
    if self.rho < 0:
      raise ValueError(f"--rho must be >= 0, got {self.rho}")
    if self.lam < 0:
      raise ValueError(f"--lambda must be >= 0, got {self.lam}")
    if not 0.0 <= self.begin_fraction <= self.end_fraction <= 1.0:
      raise ValueError("sparsifier.begin_fraction <= sparsifier.end_fraction must lie in [0, 1]")

  @property
  def projection(self) -> Projection:
    return Projection(self.sparsity, self.scope, self.n_m)

  @property
  def uses_admm(self) -> bool:
    return self.name in ("safe", "safe_plus", "admm")

  @property
  def uses_sam(self) -> bool:
    return self.name in ("safe", "safe_plus") and self.rho > 0

  @property
  def needs_input_norms(self) -> bool:
    """The train step must pass `input_sq_norms=` (SAFE+ with activation importance)."""
    return self.name == "safe_plus" and self.importance == "activation"

  @property
  def target_sparsity(self) -> float:
    return 0.0 if self.name == "none" else self.projection.target_sparsity


def make_optimizer(cfg: SparsifierConfig, base: optax.GradientTransformation,
                   total_steps: int, shardings: Any = None
                   ) -> optax.GradientTransformationExtraArgs:
  """base optimizer wrapped by the sparsifier; update(..., value_and_grad_fn=f) for SAFE.

  shardings: optional `prunable_shardings` tree; the projection then runs per shard.
  """
  projection = dataclasses.replace(cfg.projection, shardings=shardings)
  if cfg.name == "none":
    return optax.with_extra_args_support(base)
  if cfg.uses_admm:
    penalty = schedules.penalty_schedule(cfg.lam, cfg.lambda_schedule, total_steps)
    importance = cfg.importance if cfg.name == "safe_plus" else None
    parts = [optax.masked(admm(projection, penalty, cfg.dual_update_interval, importance),
                          prunable_tree), base]
    if cfg.uses_sam:
      parts.insert(0, sam_gradient(cfg.rho))
    return optax.chain(*parts)
  begin = int(cfg.begin_fraction * total_steps)
  end = int(cfg.end_fraction * total_steps)
  sparsity_fn = schedules.sparsity_schedule(projection.sparsity, cfg.sp_schedule, begin, end)
  if cfg.name == "iht":
    sparsifier = baselines.iht(projection, sparsity_fn)
  elif cfg.name == "gmp":
    sparsifier = baselines.gmp(projection, sparsity_fn, cfg.prune_interval, end)
  else:
    sparsifier = baselines.one_shot_magnitude(projection, int(cfg.prune_fraction * total_steps))
  return optax.chain(base, optax.masked(sparsifier, prunable_tree))
