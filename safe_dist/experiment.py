"""The typed description of one run; fiddle configs in `configs/` build it."""

import dataclasses
from typing import Optional

import jax.numpy as jnp

from safe_dist import data
from safe_dist import models
from safe_dist import tasks
from safe_dist.models.llama import LlamaConfig
from safe_dist.optim import OptimizerConfig
from safe_dist.sharding import MeshConfig
from safe_dist.sparsity import SparsifierConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """[--model]: a name of `safe_dist.models.MODEL_NAMES`; `llama` takes its architecture from
  `llama` (a `LlamaConfig`)."""
  name: str = "ResNet20"
  llama: Optional[LlamaConfig] = None

  def __post_init__(self):
    if self.name not in models.MODEL_NAMES:
      raise ValueError(f"--model must be one of {models.MODEL_NAMES}, got {self.name!r}")
    if (self.name == models.LLAMA) != (self.llama is not None):
      raise ValueError("model.llama (the architecture) is given exactly when --model is "
                       f"{models.LLAMA!r} (e.g. --config config:lm_shakespeare_tiny); got "
                       f"--model {self.name!r} with model.llama={self.llama}")

  def build(self, info: data.DatasetInfo, half_precision: bool):
    dtype = jnp.bfloat16 if half_precision else jnp.float32
    if self.llama is not None:
      if info.num_classes > self.llama.vocab_size:
        raise ValueError(f"the tokenizer's {info.num_classes} tokens do not fit "
                         f"model.llama.vocab_size={self.llama.vocab_size}")
      return models.create_llama(self.llama, dtype)
    return models.create_model(self.name, info.num_classes, mean=info.mean, std=info.std,
                               dtype=dtype)

  @property
  def has_batch_norm(self) -> bool:
    return models.has_batch_norm(self.name)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """[--dataset --data_dir --label_noise_ratio --validation_examples]; max_*_examples take a
  slice (debug mode).

  validation_examples N > 0: N training examples, the same for every seed
  (`safe_dist.data.pipeline.validation_split`), are held out of training and every clean
  evaluation of the run uses them instead of the test split (image datasets only).

  Text corpora (`safe_dist.data.CORPUS_NAMES`) are read as windows of `seqlen` tokens of
  `tokenizer` ("bytes", or a pretrained model's; see `safe_dist.lm.tokenization`).
  """
  name: str = "cifar10"
  data_dir: Optional[str] = None
  label_noise_ratio: float = 0.0
  augment: bool = True
  max_train_examples: Optional[int] = None
  max_eval_examples: Optional[int] = None
  validation_examples: int = 0
  tokenizer: str = "bytes"
  seqlen: int = 256

  def __post_init__(self):
    names = data.DATASET_NAMES + data.CORPUS_NAMES
    if self.name not in names:
      raise ValueError(f"--dataset must be one of {names}, got {self.name!r}")
    if not 0.0 <= self.label_noise_ratio < 1.0:
      raise ValueError(f"--label_noise_ratio must be in [0, 1), got {self.label_noise_ratio}")
    if self.validation_examples < 0:
      raise ValueError(f"--validation_examples must be >= 0, got {self.validation_examples}")
    if self.validation_examples and data.is_text(self.name):
      raise ValueError(f"--validation_examples holds out images; text corpora "
                       f"{data.CORPUS_NAMES} have their own validation split")
    if self.seqlen < 2:
      raise ValueError(f"--seqlen must be >= 2, got {self.seqlen}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: length, batch, seed, precision, evaluation, logging and checkpoint cadence."""
  num_epochs: float = 200
  batch_size: int = 128
  seed: int = 1
  max_steps: Optional[int] = None  # overrides num_epochs (debug runs)
  eval_batch_size: int = 500
  eval_every_epochs: float = 1.0
  bnt_sample_size: int = 10000
  half_precision: bool = False
  log_every_steps: int = 50
  checkpoint_every_epoch: int = 1
  checkpoint_every_steps: Optional[int] = None
  keep_checkpoints: int = 3
  check_nans: bool = False
  # Hessian top eigenvalue and trace on a fixed held-out batch every `sharpness_every_epochs`
  # (0: never), for x and for Proj(x): at most `sharpness_iters` power iterations and
  # `sharpness_samples` Hutchinson samples, cut to fit `monitoring_share` of the training time
  # (None: not budgeted, every measurement runs in full).
  sharpness_every_epochs: float = 10.0
  sharpness_batch_size: int = 256
  sharpness_iters: int = 20
  sharpness_samples: int = 10
  monitoring_share: Optional[float] = 0.05

  def __post_init__(self):
    if self.num_epochs <= 0:
      raise ValueError(f"--num_epochs must be > 0, got {self.num_epochs}")
    if self.batch_size < 1:
      raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
    if self.bnt_sample_size < 0:
      raise ValueError(f"--bnt_sample_size must be >= 0, got {self.bnt_sample_size}")
    if self.checkpoint_every_epoch < 1:
      raise ValueError(f"--checkpoint_every_epoch must be >= 1, got {self.checkpoint_every_epoch}")
    if self.sharpness_every_epochs < 0:
      raise ValueError(f"--sharpness_every must be >= 0 epochs, got {self.sharpness_every_epochs}")
    if self.monitoring_share is not None and not 0.0 < self.monitoring_share <= 1.0:
      raise ValueError("train.monitoring_share must be in (0, 1] or None (not budgeted), got "
                       f"{self.monitoring_share}")
    if self.max_steps is not None and self.max_steps < 1:
      raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs; equal experiments give bit-identical runs.

  task: a name of `safe_dist.tasks.TASKS` (what the model is trained to do).
  """
  task: str = "classification"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  sparsifier: SparsifierConfig = SparsifierConfig()
  mesh: MeshConfig = MeshConfig()
  train: TrainConfig = TrainConfig()
  eval_sparsities: tuple[float, ...] = ()

  def __post_init__(self):
    tasks.get_task(self.task)
    expected = ("next_token" if data.is_text(self.data.name) else "classification")
    if self.task != expected or (self.model.name == models.LLAMA) != data.is_text(self.data.name):
      raise ValueError(
          f"task {self.task!r}, --model {self.model.name!r} and --dataset {self.data.name!r} "
          f"do not go together: text corpora {data.CORPUS_NAMES} train --model llama on the "
          "next_token task (config:lm_shakespeare_tiny), image datasets a vision model on "
          "classification")
    if self.sparsifier.penalty_pull is not None and self.optimizer.name != "sgd":
      raise ValueError(f"--penalty_pull needs --optimizer sgd (the pull sums SGD's lr x lambda "
                       f"steps); got --optimizer {self.optimizer.name}: set --lambda instead")
    for s in self.eval_sparsities:
      if not 0.0 <= s < 1.0:
        raise ValueError(f"--eval_sparsities must lie in [0, 1), got {s}")
