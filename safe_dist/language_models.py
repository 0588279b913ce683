"""Language models for the command lines: one loaded by name or path, sharded, and its perplexity.

A model becomes a `Run` of an experiment that describes it (task next_token, `--model llama`
with the model's architecture), so that evaluation reuses the trainer's jitted, sharded eval
step, meshes and shardings. Accepted `--model` values: a run's workdir (its final network),
a pruned model written by `prune_lm`, or whatever `safe_dist.lm.pretrained` loads (a named model, an HF directory, a GGUF file).
"""

import dataclasses
import json
import math
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from safe_dist import checkpointing
from safe_dist import evaluation
from safe_dist import run_setup
from safe_dist import sharding
from safe_dist import workdir as workdir_lib
from safe_dist.data import text
from safe_dist.experiment import DataConfig, Experiment, ModelConfig, TrainConfig
from safe_dist.lm import pretrained
from safe_dist.models.llama import LlamaConfig
from safe_dist.sparsity import SparsifierConfig

FLAGS = flags.FLAGS
PRUNED_MODEL_FILE = "model.json"  # a pruned model written by `prune_lm`
PARAMS_DIR = "params"


def define_mesh_flags() -> None:
  """--mesh and the multi-host flags of the language-model command lines."""
  flags.DEFINE_string("mesh", "-1,1,1", "Mesh sizes DATA,FSDP,TENSOR (one may be -1: the "
                      "remaining devices); windows split over data x fsdp, weights over "
                      "fsdp x tensor.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def mesh_config(value: Optional[str] = None) -> sharding.MeshConfig:
  value = FLAGS.mesh if value is None else value
  try:
    data, fsdp, tensor = (int(v) for v in value.split(","))
    return sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
  except ValueError as e:
    raise ValueError(f"--mesh must be DATA,FSDP,TENSOR sizes, e.g. 2,2,2 or -1,1,1; got "
                     f"{value!r} ({e})") from None


@dataclasses.dataclass
class LanguageModel:
  run: run_setup.Run  # jitted eval step, mesh and shardings of the model
  params: Any  # sharded like run.param_shardings
  tokenizer: str  # a name `safe_dist.lm.tokenization.get_tokenizer` takes
  description: str  # what the weights are


def describing_experiment(config: LlamaConfig, tokenizer: str, mesh: sharding.MeshConfig,
                          batch_size: int) -> Experiment:
  """The experiment of evaluating a dense `config` model on batches of `batch_size` windows."""
  return Experiment(
      task="next_token", model=ModelConfig(name="llama", llama=config),
      data=DataConfig(name=text.CORPUS_NAMES[0], tokenizer=tokenizer),
      sparsifier=SparsifierConfig(name="none"), mesh=mesh,
      train=TrainConfig(batch_size=batch_size, eval_batch_size=batch_size,
                        sharpness_every_epochs=0, bnt_sample_size=0))


def _batch_multiple(batch_size: int, mesh_cfg: sharding.MeshConfig) -> int:
  """`batch_size` rounded up to a multiple of the data-parallel size (and process count)."""
  dp = math.lcm(sharding.data_parallel_size(sharding.make_mesh(mesh_cfg)), jax.process_count())
  return -(-batch_size // dp) * dp


def _from_workdir(workdir: str, mesh_cfg, batch_size: int) -> LanguageModel:
  exp = workdir_lib.stored_experiment(workdir)
  if exp.model.llama is None:
    raise ValueError(f"--model {workdir}: the run there trains {exp.model.name!r}, not a "
                     "language model")
  exp = dataclasses.replace(exp, mesh=mesh_cfg, train=dataclasses.replace(
      exp.train, eval_batch_size=batch_size))
  run = run_setup.setup(exp, info=run_setup.shapes_only_info(exp))
  step, state = checkpointing.restore_last(
      workdir, run.abstract_state, f"--model {workdir}: the run there has no checkpoint yet")
  network = evaluation.final_network(run, state)
  return LanguageModel(run, network.params, exp.data.tokenizer,
                       f"{workdir} step {step}: {network.description['network']}")


def save_pruned(directory: str, model: LanguageModel, params, record: dict) -> None:
  """Writes a pruned model: `model.json` (architecture, tokenizer, `record`) and the params
  as an orbax checkpoint (`params/`), which `load` reads back onto any mesh."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
  workdir_lib.write_json(os.path.join(directory, PRUNED_MODEL_FILE), {
      "llama": dataclasses.asdict(model.run.exp.model.llama), "tokenizer": model.tokenizer,
      **record})


def _from_pruned(directory: str, mesh_cfg, batch_size: int) -> LanguageModel:
  with open(os.path.join(directory, PRUNED_MODEL_FILE)) as f:
    record = json.load(f)
  config = LlamaConfig(**record["llama"])
  exp = describing_experiment(config, record["tokenizer"], mesh_cfg, batch_size)
  run = run_setup.setup(exp, info=run_setup.shapes_only_info(exp))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, PARAMS_DIR), run.abstract_state.params)
  return LanguageModel(run, params, record["tokenizer"],
                       f"{directory}: {record.get('description', 'pruned')}")


def load(name_or_path: str, mesh_cfg: sharding.MeshConfig, batch_size: int = 8) -> LanguageModel:
  """The model `name_or_path` on the mesh of `mesh_cfg` (see the module docstring)."""
  batch_size = _batch_multiple(batch_size, mesh_cfg)
  if os.path.isfile(os.path.join(name_or_path, workdir_lib.EXPERIMENT_FILE)):
    return _from_workdir(os.path.abspath(name_or_path), mesh_cfg, batch_size)
  if os.path.isfile(os.path.join(name_or_path, PRUNED_MODEL_FILE)):
    return _from_pruned(os.path.abspath(name_or_path), mesh_cfg, batch_size)
  loaded = pretrained.load_pretrained(name_or_path, sharding.make_mesh(mesh_cfg))
  exp = describing_experiment(loaded.config, name_or_path, mesh_cfg, batch_size)
  run = run_setup.setup(exp, info=run_setup.shapes_only_info(exp))
  return LanguageModel(run, loaded.params, name_or_path, loaded.source)


def perplexity(model: LanguageModel, windows: np.ndarray,
               should_stop: Callable[[], bool] = lambda: False) -> dict:
  """{"perplexity", "loss", "accuracy", "num_tokens"} of the model over `windows`
  (num_windows, seqlen) of tokens, all processes holding the same windows."""
  run = model.run
  batches = text.eval_batches_of_windows(
      windows, batch_size=evaluation.eval_batch_size(run, len(windows)),
      process_index=jax.process_index(), process_count=jax.process_count())
  return evaluation.evaluate_batches(run, model.params, {}, batches, should_stop)
