"""`python -m safe_dist.eval` (console script `safe-eval`): evaluate the run in --workdir.

The run's experiment is read from the workdir (`experiment.json`): only evaluation flags are
needed. A training flag given anyway must agree with the run (it is refused by name
otherwise), except paths and evaluation settings (`--data_dir`, `--eval_sparsities`,
`--bnt_sample_size`). The latest checkpoint is evaluated in one of three modes (`--mode`);
the numbers go to `<workdir>/eval_<mode>.json` (or `--eval_out NAME.json`) and a table is
printed:

  clean        rates of the trained weights, and accuracy of the network hard-projected to
               the target sparsity and to every `--eval_sparsities`, each before and after
               BatchNorm re-calibration on --bnt_sample_size training samples; on the run's
               held-out validation examples when it was trained with --validation_examples,
               else on the test split (`eval_split` in the JSON says which).
  corrupt      accuracy of the final network on corrupted test sets (`--corruptions` at
               `--corrupt_intensity`): the real CIFAR-10-C files when a cifar10 run finds them
               (under --data_dir, $SAFE_DATA_DIR or next to the CIFAR-10 files, in
               `CIFAR-10-C/`), else generated with `imagecorruptions` and labelled
               "ImageNet-C style" (its constants were tuned for ImageNet, not CIFAR-10-C);
               `--corrupt_cache_dir` keeps generated sets for the next network's evaluation.
  adversarial  clean and robust accuracy of the final network under PGD (`--attack_norm`,
               `--attack_steps`, `--attack_bound`, `--attack_lr`); one jitted, sharded attack.

corrupt and adversarial always use the test split.

"The final network" is what the paper evaluates and the training summary reports: the
weights hard-projected to the target sparsity (the trained weights for `--sparsifier none`),
with BatchNorm statistics re-calibrated on --bnt_sample_size training samples when the model
has BatchNorm. The work itself is `safe_dist.evaluation`'s.

Every flag value is checked before any work; a bad one stops with a message naming the flag
and its allowed values, exit status 2, and nothing written. The results file records the
settings it was made with (`settings`): an evaluation with other settings (another
`--attack_bound`, say) never replaces it, but stops before any work and asks for another
`--eval_out`; the same evaluation again (after more training) replaces it.
"""

import json
import os
import sys

from absl import app
from absl import flags as absl_flags

from safe_dist import attacks
from safe_dist import checkpointing
from safe_dist import corruptions as corruptions_lib
from safe_dist import distributed
from safe_dist import evaluation
from safe_dist import flags
from safe_dist import run_setup
from safe_dist import workdir as workdir_lib

FLAGS = absl_flags.FLAGS
_CONFIG = flags.define_flags()
MODES = ("clean", "corrupt", "adversarial")
DEFAULT_ATTACK_BOUND = {"linf": 1 / 255, "l2": 3 / 255}
# Training flags that evaluation may set differently from the run: paths and its own settings.
EVALUATION_FLAGS = ("data_dir", "eval_sparsities", "bnt_sample_size")

absl_flags.DEFINE_string("mode", "clean", f"Evaluation mode ({', '.join(MODES)}).")
absl_flags.DEFINE_list("corruptions", list(corruptions_lib.CORRUPTIONS),
                       "--mode corrupt: comma-separated corruption names (default: all 19).")
absl_flags.DEFINE_integer("corrupt_intensity", 3, "--mode corrupt: corruption intensity, 1..5.")
absl_flags.DEFINE_integer("corrupt_max_examples", 1000,
                          "--mode corrupt: the first N test examples (generating corruptions is "
                          "slow: ~2 min for all 19 at 1000 28x28 images on one CPU core); 0 for "
                          "all.")
absl_flags.DEFINE_integer("corrupt_seed", 0, "--mode corrupt: seed of generated corruptions.")
absl_flags.DEFINE_string("corrupt_cache_dir", "",
                         "--mode corrupt: a folder where generated corrupted sets are kept, so "
                         "that evaluating other networks on the same test examples reads them "
                         "instead of generating them again ('': no cache).")
absl_flags.DEFINE_string("attack_norm", "linf",
                         f"--mode adversarial: PGD norm ({', '.join(attacks.NORMS)}).")
absl_flags.DEFINE_integer("attack_steps", 10, "--mode adversarial: PGD steps.")
absl_flags.DEFINE_float("attack_bound", None, "--mode adversarial: radius of the PGD ball in "
                        "pixel units of [0, 1] (default 1/255 for linf, 3/255 for l2).")
absl_flags.DEFINE_float("attack_lr", None,
                        "--mode adversarial: PGD step size (default bound/4).")
absl_flags.DEFINE_integer("attack_max_examples", 0,
                          "--mode adversarial: the first N test examples; 0 for all.")
absl_flags.DEFINE_string("eval_out", "", "The results file, a name in --workdir ending in "
                         ".json (default eval_<mode>.json). One written with other settings "
                         "is kept: the evaluation stops and asks for another name.")


def check_flags(flag_values=FLAGS) -> None:
  """Raises ValueError naming the flag and its allowed values (every mode's flags)."""
  if flag_values.mode not in MODES:
    raise ValueError(f"--mode must be one of {', '.join(MODES)}; got {flag_values.mode!r}")
  if not flag_values.corruptions:
    raise ValueError("--corruptions must name at least one of "
                     f"{', '.join(corruptions_lib.CORRUPTIONS)}")
  for name in flag_values.corruptions:
    corruptions_lib.validate(name, flag_values.corrupt_intensity)
  cache_dir = flag_values.corrupt_cache_dir
  if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
    raise ValueError(f"--corrupt_cache_dir must be a folder (or '' for no cache); "
                     f"{cache_dir!r} is a file")
  for name in ("corrupt_max_examples", "attack_max_examples"):
    if getattr(flag_values, name) < 0:
      raise ValueError(f"--{name} must be >= 0 (0: all), got {getattr(flag_values, name)}")
  attacks.validate(flag_values.attack_norm, flag_values.attack_steps,
                   *attack_bound_and_lr(flag_values))


def attack_bound_and_lr(flag_values=FLAGS) -> tuple[float, float]:
  bound = flag_values.attack_bound
  if bound is None:
    bound = DEFAULT_ATTACK_BOUND.get(flag_values.attack_norm, 1 / 255)
  lr = flag_values.attack_lr if flag_values.attack_lr is not None else bound / 4
  return float(bound), float(lr)


def evaluation_settings(experiment, flag_values=FLAGS) -> dict:
  """What decides --mode's numbers besides the checkpoint, as the results file records it."""
  settings = {"mode": flag_values.mode, "bnt_sample_size": experiment.train.bnt_sample_size}
  if flag_values.mode == "clean":
    settings["eval_sparsities"] = list(experiment.eval_sparsities)
  elif flag_values.mode == "corrupt":
    settings.update(corruptions=list(flag_values.corruptions),
                    corrupt_intensity=flag_values.corrupt_intensity,
                    corrupt_max_examples=flag_values.corrupt_max_examples,
                    corrupt_seed=flag_values.corrupt_seed)
  else:
    bound, lr = attack_bound_and_lr(flag_values)
    settings.update(attack_norm=flag_values.attack_norm, attack_steps=flag_values.attack_steps,
                    attack_bound=bound, attack_lr=lr,
                    attack_max_examples=flag_values.attack_max_examples)
  return json.loads(json.dumps(settings))  # as read back from the file


def results_path(workdir: str, name: str, settings: dict) -> str:
  """Where the results go: `name` in workdir, unless a file there holds results of other
  settings (ValueError naming --eval_out; the file is kept)."""
  if os.path.basename(name) != name or not name.endswith(".json"):
    raise ValueError(f"--eval_out must be a file name ending in .json (it is written in "
                     f"--workdir), got {name!r}")
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return path
  try:
    with open(path) as f:
      recorded = json.load(f).get("settings")
  except (OSError, ValueError, AttributeError):
    recorded = None
  if recorded == settings:
    return path
  if recorded is None:
    why = "without a record of its settings"
  else:
    why = "with " + ", ".join(f"{k} {recorded.get(k)!r} (here {v!r})"
                              for k, v in settings.items() if recorded.get(k) != v)
  raise ValueError(f"--workdir already holds {name}, written {why}; it is kept: name this "
                   "evaluation's file with --eval_out NAME.json")


def experiment_to_evaluate(workdir: str):
  """The run's experiment; with --config, the one it describes (which must be the run's)."""
  if FLAGS["config"].present:
    experiment = flags.build_experiment(flags.resolved_config(_CONFIG))
    if not workdir_lib.check_workdir(experiment, workdir):
      raise ValueError(f"--workdir {workdir} holds no run (no {workdir_lib.EXPERIMENT_FILE})")
    return experiment
  return flags.apply_given_flags(workdir_lib.stored_experiment(workdir),
                                 overridable=EVALUATION_FLAGS)


def _print_clean(results: dict) -> None:
  print(f"evaluated on the {results['eval_split']} split")
  dense = results["dense"]
  print(f"dense (trained x): accuracy {dense['accuracy']:.2%}, loss {dense['loss']:.4f}"
        + (f", perplexity {dense['perplexity']:.4f}" if "perplexity" in dense else ""))
  print(f"{'sparsity':>9} {'zeros':>8} {'accuracy':>9} {'after BN recal.':>16} "
        f"{'perplexity':>11}")
  for s, row in results["projected"].items():
    recal, ppl = row.get("accuracy_bn_recalibrated"), row.get("perplexity")
    print(f"{s:>9} {row['weight_sparsity']:>8.2%} {row['accuracy']:>9.2%} "
          f"{'-' if recal is None else f'{recal:.2%}':>16} "
          f"{'-' if ppl is None else f'{ppl:.4f}':>11}")


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


def _print_adversarial(results: dict) -> None:
  a = results["attack"]
  print(f"PGD {a['norm']}: {a['steps']} steps, bound {a['bound']:.6g} "
        f"(= {a['bound'] * 255:.4g}/255), lr {a['lr']:.6g}; {results['num_examples']} examples")
  print(f"{'':>8} {'accuracy':>9} {'loss':>8}")
  print(f"{'clean':>8} {results['clean_accuracy']:>9.2%} {results['clean_loss']:>8.4f}")
  print(f"{'robust':>8} {results['robust_accuracy']:>9.2%} {results['robust_loss']:>8.4f}")


def evaluate_checkpoint(run, state, should_stop) -> tuple[dict, callable]:
  """The results of --mode on `state`, and the function that prints them."""
  if FLAGS.mode == "clean":
    return evaluation.clean_eval(run, state, should_stop), _print_clean
  network = evaluation.final_network(run, state, should_stop)
  results = dict(network.description)
  if FLAGS.mode == "corrupt":
    results.update(evaluation.corrupt_eval(
        run, network, list(FLAGS.corruptions), FLAGS.corrupt_intensity,
        FLAGS.corrupt_max_examples or None, FLAGS.corrupt_seed, should_stop,
        FLAGS.corrupt_cache_dir or None))
    return results, _print_corrupt
  bound, lr = attack_bound_and_lr()
  results.update(evaluation.adversarial_eval(
      run, network, FLAGS.attack_norm, FLAGS.attack_steps, bound, lr,
      FLAGS.attack_max_examples or None, run.exp.train.seed, should_stop))
  return results, _print_adversarial


def main(argv):
  flags.checked(argv, check_flags)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    experiment = experiment_to_evaluate(workdir)
    if experiment.task != "classification" and FLAGS.mode != "clean":
      raise ValueError(f"--mode {FLAGS.mode} evaluates image classifiers; the run in --workdir "
                       f"is a {experiment.task} model: use --mode clean, or python -m "
                       "safe_dist.lm_eval --model WORKDIR for perplexity on other text")
    settings = evaluation_settings(experiment)
    out_path = results_path(workdir, FLAGS.eval_out or f"eval_{FLAGS.mode}.json", settings)
    run = run_setup.setup(experiment)
    step, state = checkpointing.restore_last(workdir, run.abstract_state,
                                             f"--workdir {FLAGS.workdir} holds no checkpoint")
    stop = distributed.StopCheck(flags.StopOnSignal())
    results, show = evaluate_checkpoint(run, state, stop)
  except (ValueError, FileNotFoundError, distributed.Interrupted) as e:
    flags.fail(str(e))
  results = {"step": step, "mode": FLAGS.mode, **results, "settings": settings}
  if os.path.exists(out_path) and distributed.is_main_process():
    print(f"replacing {out_path} (an evaluation with the same settings)")
  workdir_lib.write_json(out_path, results)
  if distributed.is_main_process():
    print(f"step {step} of {FLAGS.workdir}")
    if FLAGS.mode != "clean":
      print(f"network: {results['network']} (weight sparsity {results['weight_sparsity']:.2%})")
    show(results)


def run():
  """Console-script entry point."""
  app.run(main, argv=flags.checked_config_names(sys.argv))


if __name__ == "__main__":
  run()
