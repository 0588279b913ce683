"""`python -m safe_dist.eval` (console script `safe-eval`): evaluate the run in --workdir.

Takes the training flags, finds the run's latest checkpoint and evaluates it in one of three
modes (`--mode`), writing the numbers to `<workdir>/eval_<mode>.json` and printing a table:

  clean        accuracy and loss of the trained weights, of the network hard-projected to the
               target sparsity and to every `--eval_sparsities`, each before and after
               BatchNorm re-calibration on --bnt_sample_size training samples.
  corrupt      accuracy of the final network on corrupted test sets (`--corruptions` at
               `--corrupt_intensity`): the real CIFAR-10-C files when a cifar10 run finds them
               (under --data_dir, $SAFE_DATA_DIR or next to the CIFAR-10 files, in
               `CIFAR-10-C/`), else generated with `imagecorruptions` and labelled
               "ImageNet-C style" (its constants were tuned for ImageNet, not CIFAR-10-C).
  adversarial  clean and robust accuracy of the final network under PGD (`--attack_norm`,
               `--attack_steps`, `--attack_bound`, `--attack_lr`); one jitted, sharded attack.

"The final network" is what the paper evaluates and the training summary reports: the
weights hard-projected to the target sparsity (the trained weights for `--sparsifier none`),
with BatchNorm statistics re-calibrated on --bnt_sample_size training samples when the model
has BatchNorm.

Every flag value is checked before any work; a bad one stops with a message naming the flag
and its allowed values, exit status 2, and nothing written.
"""

import json
import math
import os
import sys
from typing import Iterator, Optional

from absl import app
from absl import flags as absl_flags
import numpy as np

from safe_dist import flags
from safe_dist import corruptions as corruptions_lib

FLAGS = absl_flags.FLAGS
_CONFIG = flags.define_flags()
MODES = ("clean", "corrupt", "adversarial")
ATTACK_NORMS = ("linf", "l2")  # safe_dist.attacks.NORMS
DEFAULT_ATTACK_BOUND = {"linf": 1 / 255, "l2": 3 / 255}

absl_flags.DEFINE_string("mode", "clean", f"Evaluation mode ({', '.join(MODES)}).")
absl_flags.DEFINE_list("corruptions", list(corruptions_lib.CORRUPTIONS),
                  "--mode corrupt: comma-separated corruption names (default: all 19).")
absl_flags.DEFINE_integer("corrupt_intensity", 3, "--mode corrupt: corruption intensity, 1..5.")
absl_flags.DEFINE_integer("corrupt_max_examples", 1000,
                     "--mode corrupt: the first N test examples (generating corruptions is "
                     "slow, ~1 s an image for glass_blur); 0 for all.")
absl_flags.DEFINE_integer("corrupt_seed", 0, "--mode corrupt: seed of generated corruptions.")
absl_flags.DEFINE_string("attack_norm", "linf",
                    f"--mode adversarial: PGD norm ({', '.join(ATTACK_NORMS)}).")
absl_flags.DEFINE_integer("attack_steps", 10, "--mode adversarial: PGD steps.")
absl_flags.DEFINE_float("attack_bound", None, "--mode adversarial: radius of the PGD ball in pixel "
                   "units of [0, 1] (default 1/255 for linf, 3/255 for l2).")
absl_flags.DEFINE_float("attack_lr", None, "--mode adversarial: PGD step size (default bound/4).")
absl_flags.DEFINE_integer("attack_max_examples", 0,
                     "--mode adversarial: the first N test examples; 0 for all.")


# ---------------------------------------------------------------------------------------------
# Flag checks: before any work.

def check_flags(flag_values=FLAGS) -> None:
  """Raises ValueError naming the flag and its allowed values (every mode's flags)."""
  if flag_values.mode not in MODES:
    raise ValueError(f"--mode must be one of {', '.join(MODES)}; got {flag_values.mode!r}")
  names = flag_values.corruptions
  if not names:
    raise ValueError("--corruptions must name at least one of "
                     f"{', '.join(corruptions_lib.CORRUPTIONS)}")
  unknown = [n for n in names if n not in corruptions_lib.CORRUPTIONS]
  if unknown:
    raise ValueError(f"--corruptions: unknown {', '.join(map(repr, unknown))}; allowed: "
                     f"{', '.join(corruptions_lib.CORRUPTIONS)}")
  if not 1 <= flag_values.corrupt_intensity <= 5:
    raise ValueError("--corrupt_intensity must be an integer in 1..5, got "
                     f"{flag_values.corrupt_intensity}")
  for name in ("corrupt_max_examples", "attack_max_examples"):
    if getattr(flag_values, name) < 0:
      raise ValueError(f"--{name} must be >= 0 (0: all), got {getattr(flag_values, name)}")
  norm, steps = flag_values.attack_norm, flag_values.attack_steps
  if norm not in ATTACK_NORMS:
    raise ValueError(f"--attack_norm must be one of {', '.join(ATTACK_NORMS)}; got {norm!r}")
  if steps < 1:
    raise ValueError(f"--attack_steps must be an integer >= 1, got {steps}")
  bound, lr = attack_bound_and_lr(flag_values)
  if not (math.isfinite(bound) and bound > 0):
    raise ValueError(f"--attack_bound must be a number > 0, got {bound}")
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"--attack_lr must be a number > 0, got {lr}")


def attack_bound_and_lr(flag_values=FLAGS) -> tuple[float, float]:
  bound = flag_values.attack_bound
  if bound is None:
    bound = DEFAULT_ATTACK_BOUND.get(flag_values.attack_norm, 1 / 255)
  lr = flag_values.attack_lr if flag_values.attack_lr is not None else bound / 4
  return float(bound), float(lr)


# ---------------------------------------------------------------------------------------------
# Weighted evaluation over in-memory arrays.

def _limit(n: int, *limits: Optional[int]) -> int:
  for limit in limits:
    if limit:
      n = min(n, limit)
  return n


def _array_batches(run, images: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
  """Global batches {"image", "label", "weight"} covering `images` once, in order.

  The layout of `data.make_eval_batches`: global batches of eval_batch_size rounded up to the
  data-parallel size, zero-padded at the end with weight 0; process i builds rows
  [i*B/P, (i+1)*B/P) of each. uint8 images are scaled to [0, 1].
  """
  import jax  # pylint: disable=g-import-not-at-top
  from safe_dist import sharding, trainer  # pylint: disable=g-import-not-at-top
  dp = sharding.data_parallel_size(run.mesh)
  batch_size = math.ceil(run.exp.train.eval_batch_size / dp) * dp
  local = batch_size // jax.process_count()
  scale = 255.0 if np.issubdtype(images.dtype, np.integer) else 1.0
  n = len(labels)
  for start in range(0, n, batch_size):
    rows = start + jax.process_index() * local + np.arange(local)
    real = rows < n
    index = np.where(real, rows, 0)
    image = np.where(real.reshape((-1,) + (1,) * (images.ndim - 1)),
                     images[index].astype(np.float32) / scale, 0.0).astype(np.float32)
    yield trainer.global_batch(run.mesh, {
        "image": image, "label": np.where(real, labels[index], 0).astype(np.int32),
        "weight": real.astype(np.float32)})


def evaluate_arrays(run, params, batch_stats, images, labels) -> dict:
  """Accuracy and loss of (params, batch_stats) on in-memory images, labels (padding weighted
  out): the sums of `run.eval_step`, as `trainer.evaluate` does for a split."""
  from safe_dist import trainer  # pylint: disable=g-import-not-at-top
  return trainer.evaluate_batches(run, params, batch_stats, _array_batches(run, images, labels))


# ---------------------------------------------------------------------------------------------
# The network that is evaluated.

def final_network(run, state) -> tuple:
  """(params, batch_stats, description) of the network the paper evaluates (see the docstring)."""
  from safe_dist import trainer  # pylint: disable=g-import-not-at-top
  from safe_dist.sparsity import weight_sparsity  # pylint: disable=g-import-not-at-top
  exp, sp = run.exp, run.exp.sparsifier
  params, batch_stats = trainer.final_network(run, state)
  recalibrated = bool(state.batch_stats) and exp.train.bnt_sample_size > 0
  return params, batch_stats, {
      "network": ("trained weights" if sp.name == "none" else
                  "hard-projected to the target sparsity")
                 + (", BatchNorm re-calibrated" if recalibrated else ""),
      "target_sparsity": sp.target_sparsity,
      "weight_sparsity": float(weight_sparsity(params)),
      "bn_recalibrated": recalibrated,
      "bnt_sample_size": exp.train.bnt_sample_size if recalibrated else 0,
  }


def _test_set(run, max_examples: Optional[int]) -> tuple:
  from safe_dist import data as data_lib  # pylint: disable=g-import-not-at-top
  exp = run.exp
  images, labels = data_lib.load_split(exp.data.name, "test", exp.data.data_dir)
  n = _limit(len(labels), exp.data.max_eval_examples, max_examples)
  return images[:n], labels[:n]


# ---------------------------------------------------------------------------------------------
# clean

def clean_eval(run, state) -> dict:
  """Accuracy of x, and of Proj_s(x) before/after BN re-calibration for each sparsity s."""
  from safe_dist import trainer  # pylint: disable=g-import-not-at-top
  from safe_dist.sparsity import weight_sparsity  # pylint: disable=g-import-not-at-top
  exp = run.exp
  results = {"dense": trainer.evaluate(run, state.params, state.batch_stats), "projected": {}}
  sparsities = [exp.sparsifier.projection.sparsity] + list(exp.eval_sparsities)
  for s in dict.fromkeys(sparsities):
    projected = run.project(state.params, float(s))
    row = {"weight_sparsity": float(weight_sparsity(projected)),
           "accuracy": trainer.evaluate(run, projected, state.batch_stats)["accuracy"]}
    if state.batch_stats:
      stats = trainer.recalibrate_batch_stats(run, projected, state.batch_stats)
      row["accuracy_bn_recalibrated"] = trainer.evaluate(run, projected, stats)["accuracy"]
    results["projected"][f"{s:g}"] = row
  return results


def _print_clean(results: dict) -> None:
  print(f"dense (trained x): accuracy {results['dense']['accuracy']:.2%}, "
        f"loss {results['dense']['loss']:.4f}")
  print(f"{'sparsity':>9} {'zeros':>8} {'accuracy':>9} {'after BN recal.':>16}")
  for s, row in results["projected"].items():
    recal = row.get("accuracy_bn_recalibrated")
    print(f"{s:>9} {row['weight_sparsity']:>8.2%} {row['accuracy']:>9.2%} "
          f"{'-' if recal is None else f'{recal:.2%}':>16}")


# ---------------------------------------------------------------------------------------------
# corrupt

def cifar10c_dir(exp, corruption: str) -> Optional[str]:
  """Where the real CIFAR-10-C files of `corruption` are, for a cifar10 run; else None.

  Looked for (as `DIR/CIFAR-10-C/` or `DIR/` itself) in --data_dir, $SAFE_DATA_DIR, the
  directory holding the CIFAR-10 files and its parent.
  """
  from safe_dist import data as data_lib  # pylint: disable=g-import-not-at-top
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


def corrupt_eval(run, params, batch_stats, names, intensity: int,
                 max_examples: Optional[int] = None, seed: int = 0) -> dict:
  """Accuracy of (params, batch_stats) on each corrupted test set, and their mean."""
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
  rows = {}
  for name in names:
    corrupted = corruptions_lib.load_corrupted(
        dirs[name], name, intensity, clean_images, clean_labels,
        max_examples=len(clean_labels), seed=seed)
    rows[name] = {**evaluate_arrays(run, params, batch_stats, corrupted.images,
                                    corrupted.labels), "source": corrupted.source}
  sources = sorted({row["source"] for row in rows.values()})
  return {
      "intensity": intensity,
      "source": sources[0] if len(sources) == 1 else "mixed: " + " and ".join(sources),
      "clean": evaluate_arrays(run, params, batch_stats, clean_images, clean_labels),
      "corruptions": rows,
      "mean_accuracy": float(np.mean([row["accuracy"] for row in rows.values()])),
  }


def _print_corrupt(results: dict) -> None:
  print(f"corrupted test sets: {results['source']}, intensity {results['intensity']}")
  print(f"{'corruption':>18} {'accuracy':>9} {'loss':>8} {'examples':>9}  source")
  clean = results["clean"]
  print(f"{'(clean)':>18} {clean['accuracy']:>9.2%} {clean['loss']:>8.4f} "
        f"{clean['num_examples']:>9}")
  for name, row in results["corruptions"].items():
    print(f"{name:>18} {row['accuracy']:>9.2%} {row['loss']:>8.4f} {row['num_examples']:>9}  "
          f"{row['source']}")
  print(f"{'mean':>18} {results['mean_accuracy']:>9.2%}")


# ---------------------------------------------------------------------------------------------
# adversarial

def adversarial_eval(run, params, batch_stats, norm: str, steps: int, bound: float, lr: float,
                     max_examples: Optional[int] = None, seed: int = 0) -> dict:
  """Clean and PGD-robust accuracy of (params, batch_stats) on the test set."""
  import jax  # pylint: disable=g-import-not-at-top
  from safe_dist import attacks, sharding, trainer  # pylint: disable=g-import-not-at-top
  batch_spec, replicated = sharding.batch_sharding(run.mesh), sharding.replicated(run.mesh)
  attack = jax.jit(attacks.make_pgd_attack(run.model, norm, steps, bound, lr),
                   in_shardings=(run.param_shardings, replicated, batch_spec, replicated),
                   out_shardings=batch_spec)
  images, labels = _test_set(run, max_examples)
  key = jax.random.PRNGKey(seed)
  clean = robust = None
  for i, batch in enumerate(_array_batches(run, images, labels)):
    clean = trainer.add_sums(clean, run.eval_step(params, batch_stats, batch))
    adversarial = attack(params, batch_stats, batch, jax.random.fold_in(key, i))
    robust = trainer.add_sums(robust, run.eval_step(params, batch_stats,
                                                    {**batch, "image": adversarial}))
  clean, robust = trainer.rates(clean), trainer.rates(robust)
  return {"attack": {"method": "PGD", "norm": norm, "steps": steps, "bound": bound, "lr": lr,
                     "seed": seed},
          "num_examples": clean["num_examples"],
          "clean_accuracy": clean["accuracy"], "clean_loss": clean["loss"],
          "robust_accuracy": robust["accuracy"], "robust_loss": robust["loss"]}


def _print_adversarial(results: dict) -> None:
  a = results["attack"]
  print(f"PGD {a['norm']}: {a['steps']} steps, bound {a['bound']:.6g} "
        f"(= {a['bound'] * 255:.4g}/255), lr {a['lr']:.6g}; {results['num_examples']} examples")
  print(f"{'':>8} {'accuracy':>9} {'loss':>8}")
  print(f"{'clean':>8} {results['clean_accuracy']:>9.2%} {results['clean_loss']:>8.4f}")
  print(f"{'robust':>8} {results['robust_accuracy']:>9.2%} {results['robust_loss']:>8.4f}")


# ---------------------------------------------------------------------------------------------

def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    check_flags()
  except ValueError as e:
    flags.fail(str(e))
  from safe_dist import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from safe_dist import trainer  # pylint: disable=g-import-not-at-top
  from safe_dist.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  checkpointer = None
  try:
    experiment = flags.build_experiment(flags.resolved_config(_CONFIG))
    if not trainer.check_workdir(experiment, FLAGS.workdir):
      raise ValueError(f"--workdir {FLAGS.workdir} holds no run (no {trainer.EXPERIMENT_FILE})")
    run = trainer.setup(experiment)
    checkpointer = Checkpointer(os.path.join(FLAGS.workdir, "checkpoints"))
    step = checkpointer.latest_step()
    if step is None:
      raise ValueError(f"--workdir {FLAGS.workdir} holds no checkpoint")
    state = checkpointer.restore(step, run.abstract_state)
    results = {"step": step, "mode": FLAGS.mode}
    if FLAGS.mode == "clean":
      results.update(clean_eval(run, state))
      show = _print_clean
    else:
      params, batch_stats, network = final_network(run, state)
      results.update(network)
      if FLAGS.mode == "corrupt":
        results.update(corrupt_eval(run, params, batch_stats, list(FLAGS.corruptions),
                                    FLAGS.corrupt_intensity, FLAGS.corrupt_max_examples or None,
                                    FLAGS.corrupt_seed))
        show = _print_corrupt
      else:
        bound, lr = attack_bound_and_lr()
        results.update(adversarial_eval(run, params, batch_stats, FLAGS.attack_norm,
                                        FLAGS.attack_steps, bound, lr,
                                        FLAGS.attack_max_examples or None,
                                        experiment.train.seed))
        show = _print_adversarial
  except (ValueError, FileNotFoundError) as e:
    if checkpointer is not None:
      checkpointer.close()
    flags.fail(str(e))
  if jax.process_index() == 0:
    _write_json(os.path.join(FLAGS.workdir, f"eval_{FLAGS.mode}.json"), results)
    print(f"step {step} of {FLAGS.workdir}")
    if FLAGS.mode != "clean":
      print(f"network: {results['network']} (weight sparsity {results['weight_sparsity']:.2%})")
    show(results)
  checkpointer.close()


def run():
  """Console-script entry point."""
  app.run(main, argv=flags.with_default_config(sys.argv))


if __name__ == "__main__":
  run()
