"""Everything a run builds before its first step: mesh, plan, model, optimizer, jitted functions.

`setup(experiment)` returns a `Run`: the jitted, sharded train/eval/projection functions and
the abstract train state that checkpoints restore into. The trainer's loop, the evaluation
module and the CLIs all start from it.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from safe_dist import data as data_lib
from safe_dist import distributed
from safe_dist import optim
from safe_dist import sharding
from safe_dist import sharpness
from safe_dist import steps as steps_lib
from safe_dist import tasks
from safe_dist.checkpointing import abstract_like
from safe_dist.experiment import Experiment
from safe_dist.sparsity import Projection, make_optimizer, prunable_shardings
from safe_dist.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """All of a run's lengths in one unit, steps (epochs are converted here, at the edge)."""
  steps_per_epoch: int
  total_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  sharpness_every_steps: int  # 0: never

  def fires(self, step: int, every: int) -> bool:
    return every > 0 and (step % every == 0 or step == self.total_steps)


def make_plan(exp: Experiment, num_train: int) -> RunPlan:
  tc = exp.train
  steps_per_epoch = num_train // tc.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"--batch_size {tc.batch_size} is larger than the {num_train} training "
                     "examples")
  total = tc.max_steps or max(int(round(tc.num_epochs * steps_per_epoch)), 1)
  eval_every = max(int(round(tc.eval_every_epochs * steps_per_epoch)), 1)
  ckpt_every = tc.checkpoint_every_steps or tc.checkpoint_every_epoch * steps_per_epoch
  sharpness_every = (max(int(round(tc.sharpness_every_epochs * steps_per_epoch)), 1)
                     if tc.sharpness_every_epochs > 0 else 0)
  return RunPlan(steps_per_epoch, total, eval_every, ckpt_every, sharpness_every)


@dataclasses.dataclass
class Run:
  """What `setup` builds for an experiment: mesh, model, jitted functions, initial state."""
  exp: Experiment
  mesh: Any
  info: Any  # data.DatasetInfo
  plan: RunPlan
  model: nn.Module
  task: tasks.Task
  lr_fn: Callable
  state_shardings: Any
  param_shardings: Any
  abstract_state: Any
  init: Callable  # seed -> TrainState
  train_step: Callable  # (state, batch) -> (state, metrics)
  eval_step: Callable  # (params, batch_stats, batch) -> the task's sums
  projection: Projection  # Proj_d of the sparsifier, carrying the kernels' shardings
  hessian_probe: sharpness.HessianProbe  # Hessian max eigenvalue and trace, budgeted
  _projectors: dict = dataclasses.field(default_factory=dict, repr=False)

  @functools.cached_property
  def penalty_pull(self) -> Optional[float]:
    """The penalty's total pull P (`schedules.penalty_pull`) for SAFE/SAFE+/ADMM under SGD;
    None otherwise (Adam's normalised steps make the pull nonlinear in lambda). Computed once
    (a sum over every step's schedules), for the start-of-run log and the summary."""
    if self.exp.optimizer.name != "sgd":
      return None
    return self.exp.sparsifier.penalty_pull_of(self.lr_fn, self.plan.total_steps,
                                               self.exp.optimizer.momentum)

  def project(self, params, sparsity: Optional[float] = None):
    """Proj_d(params) (prunable kernels masked; `sparsity` defaults to the target)."""
    if sparsity not in self._projectors:  # one jitted projection per sparsity
      self._projectors[sparsity] = jax.jit(
          lambda p: self.projection.project_params(p, sparsity),
          in_shardings=(self.param_shardings,), out_shardings=self.param_shardings)
    return self._projectors[sparsity](params)


def validate(exp: Experiment, mesh) -> None:
  """Checks that need the mesh, before any work."""
  dp = sharding.data_parallel_size(mesh)
  if exp.train.batch_size % dp:
    raise ValueError(f"--batch_size {exp.train.batch_size} must be divisible by the "
                     f"data-parallel size {dp} (mesh data x fsdp)")
  if exp.train.batch_size % jax.process_count():
    raise ValueError(f"--batch_size {exp.train.batch_size} must be divisible by the number of "
                     f"processes {jax.process_count()}")
  sam_group_size(exp, mesh)


def sam_group_size(exp: Experiment, mesh) -> int:
  """m of m-sharpness (--sam_group_size), 0 for one perturbation for the whole batch (also
  when m is the batch); ValueError naming the flag and the allowed values if the groups do
  not lay out over the mesh (`sharding.GroupLayout`)."""
  m, batch = exp.sparsifier.sam_group_size, exp.train.batch_size
  if m in (0, batch):
    return 0
  allowed = sharding.sam_group_sizes(batch, mesh)
  if m not in allowed:
    raise ValueError(
        f"--sam_group_size {m} must be 0 or --batch_size {batch}, or split the batch into "
        f"groups laid out over the mesh (a number of groups divisible by mesh.data = "
        f"{mesh.shape['data']}, m divisible by mesh.fsdp = {mesh.shape['fsdp']}); allowed: "
        f"{', '.join(str(v) for v in (0, *allowed, batch))}")
  return m


def shapes_only_info(exp: Experiment) -> data_lib.DatasetInfo:
  """What `setup` needs of the data, without reading any where the model fixes it: a language
  model's vocabulary and windows (an abstract evaluation of the state, an external model)."""
  if exp.model.llama is None:
    return data_lib.info(exp.data)
  return data_lib.DatasetInfo(exp.train.batch_size, 0, exp.model.llama.vocab_size,
                              (exp.data.seqlen - 1,), (), ())


def setup(exp: Experiment, devices=None, info: Optional[data_lib.DatasetInfo] = None) -> Run:
  """The run of `exp` (`info`: the data's description when known, e.g. without reading the
  data for an abstract evaluation of the state)."""
  mesh = sharding.make_mesh(exp.mesh, devices)
  validate(exp, mesh)
  task = tasks.get_task(exp.task)
  info = info or data_lib.info(exp.data)
  num_train = data_lib.split_size(exp.data, info, "train")  # refuses a bad validation split
  num_train = min(num_train, exp.data.max_train_examples or num_train)
  plan = make_plan(exp, num_train)
  model = exp.model.build(info, exp.train.half_precision)
  lr_fn = optim.learning_rate_schedule(exp.optimizer, plan.steps_per_epoch, plan.total_steps)
  # --penalty_pull: lambda from the pull it must reach over this run's schedules.
  exp = dataclasses.replace(exp, sparsifier=exp.sparsifier.resolve_penalty_pull(
      lr_fn, plan.total_steps, exp.optimizer.momentum))
  dummy = task.dummy_input(info.input_shape)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))
  param_shardings = sharding.shardings_for(boxed["params"], mesh)
  # The projection runs per shard of the prunable kernels (no gather of the weights).
  projection = dataclasses.replace(
      exp.sparsifier.projection,
      shardings=prunable_shardings(nn.unbox(boxed["params"]), param_shardings))
  tx = make_optimizer(exp.sparsifier, optim.make_base_optimizer(exp.optimizer, lr_fn),
                      plan.total_steps, projection=projection)

  def init(seed: int) -> TrainState:
    variables = nn.unbox(model.init(jax.random.PRNGKey(seed), dummy, train=False))
    params = variables["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  abstract = jax.eval_shape(init, 0)
  state_shardings = sharding.shardings_like_params(abstract, abstract.params, param_shardings,
                                                   mesh)
  state_shardings = state_shardings.replace(params=param_shardings)
  sharding.log_sharding_summary(abstract.params, param_shardings)

  batch_spec = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  group_size = sam_group_size(exp, mesh)
  sam_groups = (sharding.GroupLayout(exp.train.batch_size // group_size, mesh, param_shardings)
                if group_size else None)
  train_step = jax.jit(
      steps_lib.make_train_step(model, task, tx, exp.sparsifier.needs_input_norms, sam_groups),
      in_shardings=(state_shardings, batch_spec), out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  eval_step = jax.jit(steps_lib.make_eval_step(model, task),
                      in_shardings=(param_shardings, state_shardings.batch_stats, batch_spec),
                      out_shardings=replicated)
  probe = sharpness.HessianProbe(
      tasks.make_eval_loss(model, task), num_iters=exp.train.sharpness_iters,
      num_samples=exp.train.sharpness_samples,
      in_shardings=(param_shardings, state_shardings.batch_stats, batch_spec),
      agree=distributed.from_first_process)
  return Run(exp, mesh, info, plan, model, task, lr_fn, state_shardings, param_shardings,
             abstract_like(abstract, state_shardings),
             jax.jit(init, static_argnums=(0,), out_shardings=state_shardings),
             train_step, eval_step, projection, probe)
