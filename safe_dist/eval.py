"""`python -m safe_dist.eval` (console script `safe-eval`): evaluate the run in --workdir.

Takes the training flags, finds the run's latest checkpoint and reports the clean accuracy of
the trained weights, of the network hard-projected to the target sparsity and to every
`--eval_sparsities`, each before and after BatchNorm re-calibration.
"""

import json
import os
import sys

from absl import app, flags

from safe_dist import cli

FLAGS = flags.FLAGS
_CONFIG = cli.define_flags()
MODES = ("clean",)
flags.DEFINE_string("mode", "clean", f"Evaluation mode ({', '.join(MODES)}).")


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from safe_dist import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  from safe_dist import trainer  # pylint: disable=g-import-not-at-top
  from safe_dist.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  if FLAGS.mode not in MODES:
    cli.fail(f"--mode must be one of {MODES}, got {FLAGS.mode!r}")
  try:
    experiment = cli.build_experiment(cli.resolved_config(_CONFIG))
    if not trainer.check_workdir(experiment, FLAGS.workdir):
      raise ValueError(f"--workdir {FLAGS.workdir} holds no run (no {trainer.EXPERIMENT_FILE})")
    run = trainer.setup(experiment)
    checkpointer = Checkpointer(os.path.join(FLAGS.workdir, "checkpoints"))
    step = checkpointer.latest_step()
    if step is None:
      raise ValueError(f"--workdir {FLAGS.workdir} holds no checkpoint")
    state = checkpointer.restore(step, run.abstract_state)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  results = {"step": step, **clean_eval(run, state)}
  if jax.process_index() == 0:
    with open(os.path.join(FLAGS.workdir, f"eval_{FLAGS.mode}.json"), "w") as f:
      json.dump(results, f, indent=2)
    print(f"step {step} of {FLAGS.workdir}")
    _print_clean(results)
  checkpointer.close()


def run():
  """Console-script entry point."""
  app.run(main, argv=cli.with_default_config(sys.argv))


if __name__ == "__main__":
  run()
