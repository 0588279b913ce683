"""The network a run delivers, as host arrays: what every export format writes and reads back.

`inspect` reads what `--workdir` holds from its JSON records alone (before any work);
`final_network` then loads it:
- a training run's workdir: its latest checkpoint hard-projected to the target sparsity, with
  BatchNorm statistics re-calibrated (`safe_dist.evaluation.final_network`; for language
  models through `safe_dist.language_models.load`, which does the same);
- a `prune_lm --out` directory: the pruned weights as they are.
Pruned weights are exported as +0.0 (the projection leaves -0.0 where it zeroed a negative
weight); every other value is exported bit for bit.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from safe_dist import checkpointing
from safe_dist import evaluation
from safe_dist import language_models
from safe_dist import run_setup
from safe_dist import sharding
from safe_dist import workdir as workdir_lib
from safe_dist.data import DatasetInfo
from safe_dist.experiment import Experiment
from safe_dist.sparsity import prunable_tree, weight_sparsity


@dataclasses.dataclass(frozen=True)
class Source:
  """What a `--workdir` holds, read from its JSON records only (no arrays)."""
  path: str
  is_language_model: bool
  model: str  # the model's name, for messages
  n_m: Optional[tuple[int, int]]  # the N:M pattern of every pruned kernel, if any
  sparsity: str  # the sparsity in words, for messages


def _run_source(path: str) -> Source:
  exp = workdir_lib.stored_experiment(path)
  projection = exp.sparsifier.projection
  n_m = tuple(projection.n_m) if projection.scope == "nm" else None
  if exp.sparsifier.name == "none":
    sparsity = "none (dense, --sparsifier none)"
  elif n_m:
    sparsity = f"{n_m[0]}:{n_m[1]} (--nm)"
  else:
    sparsity = f"{projection.scope} {projection.sparsity:g} (--sp_scope, --sp)"
  return Source(path, exp.model.llama is not None, exp.model.name, n_m, sparsity)


def _pruned_source(path: str) -> Source:
  summary_path = os.path.join(path, workdir_lib.SUMMARY_FILE)
  summary = {}
  if os.path.isfile(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  kind = summary.get("sparsity_type", "unstructured")
  n_m = tuple(int(v) for v in kind.split(":")) if ":" in kind else None
  ratio = summary.get("sparsity_ratio")
  sparsity = kind if n_m or ratio is None else f"{kind} {ratio:g}"
  return Source(path, True, "llama", n_m, f"{sparsity} (prune_lm --sparsity_type)")


def inspect(path: str) -> Source:
  """What `path` holds; ValueError if it is neither a run's workdir nor a pruned model."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, workdir_lib.EXPERIMENT_FILE)):
    return _run_source(path)
  if os.path.isfile(os.path.join(path, language_models.PRUNED_MODEL_FILE)):
    return _pruned_source(path)
  raise ValueError(f"--workdir {path} is neither a training run's workdir (no "
                   f"{workdir_lib.EXPERIMENT_FILE}) nor a prune_lm --out directory (no "
                   f"{language_models.PRUNED_MODEL_FILE})")


@dataclasses.dataclass
class Network:
  """A network on the host: numpy params (kernels `(in, out)`) and BatchNorm statistics,
  with what rebuilds its model."""
  params: Any
  batch_stats: Any  # {} without BatchNorm
  experiment: Experiment  # the run's (or one describing a pruned language model)
  info: DatasetInfo  # classes or vocabulary, input shape, normalization
  tokenizer: Optional[str]  # language models: a name `safe_dist.lm.tokenization` takes
  n_m: Optional[tuple[int, int]]  # the N:M pattern of every pruned kernel, if any
  description: str

  @property
  def is_language_model(self) -> bool:
    return self.experiment.model.llama is not None

  @property
  def weight_sparsity(self) -> float:
    return float(weight_sparsity(self.params))

  def variables(self) -> dict:
    return {"params": self.params, **({"batch_stats": self.batch_stats}
                                      if self.batch_stats else {})}

  def model(self):
    """The flax model (`model.apply(network.variables(), inputs, train=False)`)."""
    return self.experiment.model.build(self.info, self.experiment.train.half_precision)

  def predict(self, inputs) -> np.ndarray:
    """Logits of a batch of images (N, H, W, C) in [0, 1], or of tokens (N, T)."""
    forward = _forward(self.experiment.model, self.info, self.experiment.train.half_precision)
    return np.asarray(forward(self.variables(), inputs))


@functools.lru_cache(maxsize=8)
def _forward(model_config, info: DatasetInfo, half_precision: bool):
  """The jitted inference of a model (one per architecture, so repeated predictions trace
  once)."""
  model = model_config.build(info, half_precision)
  return jax.jit(lambda variables, inputs: model.apply(variables, inputs, train=False))


def to_host(params) -> Any:
  """numpy copies of `params`, pruned weights +0.0 (not -0.0) in the prunable kernels."""
  params = jax.device_get(params)
  return jax.tree.map(lambda x, prunable: np.where(x == 0, np.zeros((), x.dtype), x)
                      if prunable else np.asarray(x), params, prunable_tree(params))


def _run_network(source: Source, mesh: sharding.MeshConfig,
                 data_dir: Optional[str]) -> Network:
  checkpoints = os.path.join(source.path, "checkpoints")
  if not os.path.isdir(checkpoints):
    raise ValueError(f"--workdir {source.path} holds no checkpoint")
  exp = dataclasses.replace(workdir_lib.stored_experiment(source.path), mesh=mesh)
  if data_dir is not None:
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, data_dir=data_dir))
  run = run_setup.setup(exp)
  step, state = checkpointing.restore_last(source.path, run.abstract_state,
                                           f"--workdir {source.path} holds no checkpoint")
  final = evaluation.final_network(run, state)
  return Network(to_host(final.params), jax.device_get(final.batch_stats), exp, run.info, None,
                 source.n_m, f"{source.path} step {step}: {final.description['network']}")


def final_network(source: Source, mesh: sharding.MeshConfig,
                  data_dir: Optional[str] = None) -> Network:
  """The network `source` delivers, on the host (`data_dir`: where a vision run's data is,
  when not where the run read it; BatchNorm re-calibration reads it)."""
  if not source.is_language_model:
    return _run_network(source, mesh, data_dir)
  model = language_models.load(source.path, mesh)
  return Network(to_host(model.params), {}, model.run.exp, model.run.info, model.tokenizer,
                 source.n_m, model.description)
