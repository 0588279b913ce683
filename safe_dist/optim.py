"""The base optimizer (SGD with momentum and weight decay, Adam, AdamW) and its learning-rate schedule."""

import dataclasses

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """[--optimizer --lr --lr_schedule --warmup_epochs --wd --momentum]; b1, b2: Adam's betas."""
  name: str = "sgd"
  lr: float = 0.1
  lr_schedule: str = "cosine"
  warmup_epochs: float = 5.0
  weight_decay: float = 1e-4
  momentum: float = 0.9
  b1: float = 0.9
  b2: float = 0.999

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"--lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
    if self.lr <= 0:
      raise ValueError(f"--lr must be > 0, got {self.lr}")
    if self.warmup_epochs < 0:
      raise ValueError(f"--warmup_epochs must be >= 0, got {self.warmup_epochs}")
    if self.weight_decay < 0:
      raise ValueError(f"--wd must be >= 0, got {self.weight_decay}")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")


def learning_rate_schedule(cfg: OptimizerConfig, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_epochs`, then constant, linear decay or cosine decay to 0."""
  warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if cfg.lr_schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.lr_schedule == "linear":
    main = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
  else:
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def make_base_optimizer(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  """SGD: coupled weight decay then heavy-ball momentum; Adam: L2 in the gradient; AdamW: decoupled."""
  if cfg.name == "sgd":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=cfg.momentum or None))
  if cfg.name == "adam":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.adam(lr, b1=cfg.b1, b2=cfg.b2))
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
