"""Evaluation of a run's networks: the sum loop, the final network, BN re-calibration, and the
clean / corrupt / adversarial evaluations. The trainer and the `eval` CLI both call it.

Every loop over batches checks `should_stop()` between batches and raises
`distributed.Interrupted`, so
a stop signal ends any evaluation within one batch. With several processes `should_stop`
must give the same answer on all of them (`distributed.StopCheck` does).
"""

import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from safe_dist import attacks
from safe_dist import corruptions as corruptions_lib
from safe_dist import data as data_lib
from safe_dist import distributed
from safe_dist import sharding
from safe_dist import steps as steps_lib
from safe_dist import tasks
from safe_dist.run_setup import Run
from safe_dist.sparsity import weight_sparsity
from safe_dist.train_state import TrainState

StopFn = Callable[[], bool]


def _never() -> bool:
  return False


def _check(should_stop: StopFn, what: str) -> None:
  if should_stop():
    raise distributed.Interrupted(f"stop requested during {what}")


def _add(totals: Optional[dict], sums: dict) -> dict:
  return sums if totals is None else jax.tree.map(jnp.add, totals, sums)


def eval_batch_size(run: Run, num_examples: int) -> int:
  """The evaluation batch: `eval_batch_size`, or fewer when there are fewer examples (no
  compute on padding), rounded up to a multiple of the data-parallel size."""
  dp = sharding.data_parallel_size(run.mesh)
  return math.ceil(min(run.exp.train.eval_batch_size, num_examples) / dp) * dp


def evaluate_batches(run: Run, params, batch_stats, local_batches: Iterable[dict],
                     should_stop: StopFn = _never) -> dict:
  """The task's rates (e.g. accuracy and loss) over this process's rows of global batches;
  padding (weight 0) is weighted out."""
  totals = None
  for local in local_batches:
    _check(should_stop, "evaluation")
    totals = _add(totals, run.eval_step(params, batch_stats,
                                        sharding.global_batch(run.mesh, local)))
  return run.task.rates(totals)


def evaluate(run: Run, params, batch_stats, split: Optional[str] = None,
             should_stop: StopFn = _never) -> dict:
  """The task's rates over a whole split of the run's dataset (default: the run's evaluation
  split, `data.eval_split`: the held-out validation examples or the test split)."""
  exp = run.exp
  split = split or data_lib.eval_split(exp.data)
  num_examples = data_lib.split_size(exp.data, run.info, split)
  num_examples = min(num_examples, exp.data.max_eval_examples or num_examples)
  batches = data_lib.eval_batches(
      exp.data, batch_size=eval_batch_size(run, num_examples), split=split,
      process_index=jax.process_index(), process_count=jax.process_count())
  return evaluate_batches(run, params, batch_stats, batches, should_stop)


def array_batches(run: Run, images: np.ndarray, labels: np.ndarray) -> Iterable[dict]:
  """This process's rows of evaluation batches over in-memory images (uint8 or [0, 1])."""
  return data_lib.eval_batches_of_arrays(images, labels,
                                         batch_size=eval_batch_size(run, len(labels)),
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())


def recalibrate_batch_stats(run: Run, params, batch_stats, should_stop: StopFn = _never):
  """BN running statistics of `params` re-estimated on `bnt_sample_size` training samples."""
  exp = run.exp
  if not batch_stats or exp.train.bnt_sample_size == 0:
    return batch_stats
  num_batches = max(exp.train.bnt_sample_size // exp.train.batch_size, 1)
  iterator = data_lib.train_iterator(
      exp.data, global_batch_size=exp.train.batch_size, seed=exp.train.seed + 1,
      for_statistics=True, process_index=jax.process_index(), process_count=jax.process_count())
  stats_step = jax.jit(steps_lib.make_batch_stats_step(run.model, run.task))
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)
  per_batch = []
  for _ in range(num_batches):
    _check(should_stop, "BatchNorm re-calibration")
    per_batch.append(stats_step(params, zeros, sharding.global_batch(run.mesh, next(iterator))))
  return steps_lib.average_trees(per_batch)


@dataclasses.dataclass
class FinalNetwork:
  """The network a run delivers: Proj_d(x) (x for `none`), BN statistics re-calibrated."""
  params: Any
  batch_stats: Any
  description: dict  # what it is, as written into eval results


def final_network(run: Run, state: TrainState, should_stop: StopFn = _never) -> FinalNetwork:
  exp = run.exp
  dense = exp.sparsifier.name == "none"
  params = state.params if dense else run.project(state.params)
  batch_stats = recalibrate_batch_stats(run, params, state.batch_stats, should_stop)
  recalibrated = bool(state.batch_stats) and exp.train.bnt_sample_size > 0
  return FinalNetwork(params, batch_stats, {
      "network": ("trained weights" if dense else "hard-projected to the target sparsity")
                 + (", BatchNorm re-calibrated" if recalibrated else ""),
      "target_sparsity": exp.sparsifier.target_sparsity,
      "weight_sparsity": float(weight_sparsity(params)),
      "bn_recalibrated": recalibrated,
      "bnt_sample_size": exp.train.bnt_sample_size if recalibrated else 0,
  })


def projected_accuracies(run: Run, state: TrainState, sparsities,
                         should_stop: StopFn = _never) -> dict:
  """{f"{s:g}": row} for Proj_s(x): weight sparsity, accuracy (and perplexity for language
  models), and accuracy after BN re-calibration."""
  rows = {}
  for s in dict.fromkeys(float(s) for s in sparsities):
    projected = run.project(state.params, s)
    rates = evaluate(run, projected, state.batch_stats, should_stop=should_stop)
    row = {"weight_sparsity": float(weight_sparsity(projected)),
           **{k: rates[k] for k in ("accuracy", "perplexity") if k in rates}}
    if state.batch_stats:
      stats = recalibrate_batch_stats(run, projected, state.batch_stats, should_stop)
      row["accuracy_bn_recalibrated"] = evaluate(run, projected, stats,
                                                 should_stop=should_stop)["accuracy"]
    rows[f"{s:g}"] = row
  return rows


def clean_eval(run: Run, state: TrainState, should_stop: StopFn = _never) -> dict:
  """Rates of x, and accuracy of Proj_s(x) before/after BN re-calibration for the target
  sparsity and every `eval_sparsities`, on the run's evaluation split (`eval_split`)."""
  exp = run.exp
  sparsities = [exp.sparsifier.projection.sparsity, *exp.eval_sparsities]
  return {"eval_split": data_lib.eval_split(exp.data),
          "dense": evaluate(run, state.params, state.batch_stats, should_stop=should_stop),
          "projected": projected_accuracies(run, state, sparsities, should_stop)}


def _test_set(run: Run, max_examples: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
  exp = run.exp
  images, labels = data_lib.load_split(exp.data.name, "test", exp.data.data_dir)
  n = len(labels)
  for limit in (exp.data.max_eval_examples, max_examples):
    n = min(n, limit) if limit else n
  return images[:n], labels[:n]


def cifar10c_dir(exp, corruption: str) -> Optional[str]:
  """Where the real CIFAR-10-C files of `corruption` are, for a cifar10 run; else None.

  Looked for (as `DIR/CIFAR-10-C/` or `DIR/` itself) in --data_dir, $SAFE_DATA_DIR, the
  directory holding the CIFAR-10 files and its parent.
  """
  if exp.data.name != "cifar10":
    return None
  candidates = [exp.data.data_dir, os.environ.get(data_lib.sources.ENV_VAR)]
  try:
    found = data_lib.sources.find_dataset_dir("cifar10", exp.data.data_dir)
    candidates += [found, os.path.dirname(found)]
  except FileNotFoundError:
    pass
  for directory in candidates:
    if directory and corruptions_lib.find_cifar10c(directory, corruption):
      return directory
  return None


def corrupt_eval(run: Run, network: FinalNetwork, names, intensity: int,
                 max_examples: Optional[int] = None, seed: int = 0,
                 should_stop: StopFn = _never, cache_dir: Optional[str] = None) -> dict:
  """Accuracy of `network` on each corrupted test set, and their mean; generated sets are
  kept in and read from `cache_dir` when one is given."""
  for name in names:
    corruptions_lib.validate(name, intensity)
  clean_images, clean_labels = _test_set(run, max_examples)
  dirs = {name: cifar10c_dir(run.exp, name) for name in names}
  if any(d is None for d in dirs.values()):
    try:
      corruptions_lib._imagecorruptions()  # pylint: disable=protected-access
    except ImportError:
      missing = ", ".join(n for n, d in dirs.items() if d is None)
      raise ValueError(f"no CIFAR-10-C files for {missing} and the `imagecorruptions` package "
                       "is not installed to generate them (pip install imagecorruptions)"
                       ) from None
  evaluate_arrays = lambda images, labels: evaluate_batches(
      run, network.params, network.batch_stats, array_batches(run, images, labels), should_stop)
  rows = {}
  for name in names:
    _check(should_stop, "corrupt evaluation")
    logging.info("corrupt evaluation: %s at intensity %d", name, intensity)
    corrupted = corruptions_lib.load_corrupted(
        dirs[name], name, intensity, clean_images, clean_labels,
        max_examples=len(clean_labels), seed=seed, cache_dir=cache_dir)
    rows[name] = {**evaluate_arrays(corrupted.images, corrupted.labels),
                  "source": corrupted.source}
  sources = sorted({row["source"] for row in rows.values()})
  return {
      "eval_split": "test",
      "intensity": intensity,
      "source": sources[0] if len(sources) == 1 else "mixed: " + " and ".join(sources),
      "clean": evaluate_arrays(clean_images, clean_labels),
      "corruptions": rows,
      "mean_accuracy": float(np.mean([row["accuracy"] for row in rows.values()])),
  }


def adversarial_eval(run: Run, network: FinalNetwork, norm: str, steps: int, bound: float,
                     lr: float, max_examples: Optional[int] = None, seed: int = 0,
                     should_stop: StopFn = _never) -> dict:
  """Clean and PGD-robust rates of `network` on the test set (one jitted, sharded attack)."""
  batch_spec = sharding.batch_sharding(run.mesh)
  attack = jax.jit(
      attacks.make_pgd_attack(tasks.make_eval_loss(run.model, run.task, reduce="sum"),
                              norm, steps, bound, lr),
      in_shardings=(run.param_shardings, run.state_shardings.batch_stats, batch_spec,
                    sharding.replicated(run.mesh)),
      out_shardings=batch_spec)
  images, labels = _test_set(run, max_examples)
  key = jax.random.PRNGKey(seed)
  params, stats = network.params, network.batch_stats
  clean = robust = None
  for i, local in enumerate(array_batches(run, images, labels)):
    _check(should_stop, "adversarial evaluation")
    batch = sharding.global_batch(run.mesh, local)
    adversarial = {**batch, "image": attack(params, stats, batch, jax.random.fold_in(key, i))}
    clean = _add(clean, run.eval_step(params, stats, batch))
    robust = _add(robust, run.eval_step(params, stats, adversarial))
  clean, robust = run.task.rates(clean), run.task.rates(robust)
  return {"attack": {"method": "PGD", "norm": norm, "steps": steps, "bound": bound, "lr": lr,
                     "seed": seed},
          "eval_split": "test", "num_examples": clean["num_examples"],
          "clean_accuracy": clean["accuracy"], "clean_loss": clean["loss"],
          "robust_accuracy": robust["accuracy"], "robust_loss": robust["loss"]}
