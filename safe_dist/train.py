"""`python -m safe_dist.train` (console script `safe-train`): train and prune one experiment.

    python -m safe_dist.train --workdir=./logdir --model VGG19-bn --dataset cifar10 \\
        --num_epochs 300 --sparsifier safe --lambda 0.0001 --lambda_schedule cosine \\
        --rho 0.1 --dual_update_interval 32 --sp .95 --seed 1
"""

import logging as logging_std
import os
import sys
import time

from absl import app, logging
from absl import flags as absl_flags

from safe_dist import distributed
from safe_dist import flags
from safe_dist import memory
from safe_dist import run_setup
from safe_dist import trainer

FLAGS = flags.FLAGS
_CONFIG = flags.define_flags()
absl_flags.DEFINE_bool("memory_report", False, "Print the bytes per device of the sharded "
                       "train state (params, optimizer, sparsifier) on the configured mesh, "
                       "evaluated abstractly (nothing allocated, no data read), and exit.")

# Exit status after a checkpoint taken on SIGTERM/SIGUSR1: launch/slurm scripts requeue on it.
REQUEUE_EXIT_CODE = 85


def _print_table(summary: dict, seconds: float, workdir: str) -> None:
  rows = [("model", summary["model"]), ("dataset", summary["dataset"]),
          ("sparsifier", summary["sparsifier"]),
          ("target sparsity", f"{summary['target_sparsity']:.2%}"),
          ("weight sparsity", f"{summary['weight_sparsity']:.2%}"),
          ("evaluated on", f"the {summary['eval_split']} split"),
          ("val accuracy (dense x)", f"{summary['val_accuracy_before_projection']:.2%}"),
          ("val accuracy (projected)", f"{summary['val_accuracy']:.2%}"),
          *([("perplexity (dense x)", f"{summary['perplexity_before_projection']:.3f}"),
             ("perplexity (projected)", f"{summary['perplexity']:.3f}")]
            if "perplexity" in summary else []),
          ("steps", str(summary["steps"])), ("time", f"{seconds / 60:.1f} min")]
  width = max(len(k) for k, _ in rows)
  print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
  print(f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}")


def _quiet_libraries() -> None:
  """Keeps the console to our own progress lines: other libraries' INFO records are dropped."""
  own = os.path.dirname(os.path.abspath(__file__))
  keep = lambda record: record.levelno >= logging_std.WARNING or record.pathname.startswith(own)
  logging.get_absl_handler().addFilter(keep)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _quiet_libraries()
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    cfg = flags.resolved_config(_CONFIG)
    experiment = flags.build_experiment(cfg)
  except ValueError as e:
    flags.fail(str(e))
  if FLAGS.memory_report:
    run = run_setup.setup(experiment, info=run_setup.shapes_only_info(experiment))
    print(memory.report(run.abstract_state, run.mesh))
    return
  stop = flags.StopOnSignal()
  start = time.time()
  try:
    summary = trainer.train_and_evaluate(experiment, FLAGS.workdir, stop_requested=stop)
  except (ValueError, FileNotFoundError, trainer.NonFiniteError) as e:
    flags.fail(str(e))
  if "interrupted_at_step" in summary:
    logging.warning("stopped by signal %s at step %d after a committed checkpoint; exiting "
                    "with %d so that the job is requeued", stop.signal,
                    summary["interrupted_at_step"], REQUEUE_EXIT_CODE)
    sys.exit(REQUEUE_EXIT_CODE)
  if distributed.is_main_process():
    _print_table(summary, time.time() - start, FLAGS.workdir)


def run():
  """Console-script entry point."""
  app.run(main, argv=flags.with_default_config(sys.argv))


if __name__ == "__main__":
  run()
