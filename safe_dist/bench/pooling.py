"""Cost of 2x2 max pooling in the train step: `layers.max_pool_2x2` against flax's `nn.max_pool`.

    python -m safe_dist.bench.pooling [--models LeNet5 --methods dense,SAFE --windows 5]
    python -m safe_dist.bench.pooling --models VGG19-bn --windows 2 --dual_update_interval 16  # GPU

For each model and method, the trainer's jitted train step (`bench.step`'s setup: the
reference config, SGD with momentum, random images: 28x28x1 for the LeNets, 32x32x3 otherwise)
is built twice, once with the models' pooling and once with `nn.max_pool` in its place, both
from the same initial state on the same batch. The two take turns window by window (K steps
each); per pair, the median step of each and their ratio, and whether the two states are still
bit-identical after all the steps (they compute the same values and gradients).
"""

import argparse
from unittest import mock

import flax.linen as nn
import jax
import numpy as np

from safe_dist.bench import step
from safe_dist.data.sources import DatasetInfo
from safe_dist import models as models_lib
from safe_dist.models import layers

MNIST_SHAPED = DatasetInfo(60000, 10000, 10, (28, 28, 1), (0.13,), (0.31,))
# The models with 2x2 max pooling.
POOLED_MODELS = [n for n in models_lib.VISION_MODEL_NAMES if n.startswith(("LeNet5", "VGG"))]
POOLINGS = {"nn.max_pool": lambda x, padding="VALID": nn.max_pool(x, (2, 2), (2, 2), padding),
            "max_pool_2x2": layers.max_pool_2x2}


def pooling_timer(exp, method: str, pooling, warmup: int, devices) -> step.StepTimer:
  """`method`'s train step with `pooling` as the models' 2x2 max pooling, warmed up."""
  info = MNIST_SHAPED if exp.model.name.startswith("LeNet") else step.CIFAR_SHAPED
  with mock.patch.object(layers, "max_pool_2x2", pooling):  # traced while patched
    run = step.setup_method(exp, method, info, devices)
    timer = step.StepTimer(run, step.random_batch(run, exp.train.batch_size))
    timer.steps(warmup)
  return timer


def max_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="LeNet5",
                      help="of " + ", ".join(POOLED_MODELS) + " (a VGG's step takes seconds on a CPU)")
  parser.add_argument("--methods", default="dense,SAFE")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--dual_update_interval", type=int, default=32,
                      help="K: steps per timed window")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
  parser.add_argument("--windows", type=int, default=5, help="timed windows per variant")
  args = parser.parse_args(argv)
  models = step.parse_names(args.models, POOLED_MODELS, "model")
  methods = step.parse_names(args.methods, step.METHODS, "method")
  devices = jax.devices()[:1]
  print(f"train step, batch {args.batch_size}, one {devices[0].platform} device; "
        f"{args.windows} windows of {args.dual_update_interval} steps per variant after "
        f"{args.warmup} warm-up steps", flush=True)
  lines = ["| model | method | nn.max_pool ms | max_pool_2x2 ms | speed-up | same state |",
           "|---|---|---:|---:|---:|---|"]
  for model in models:
    exp = step.timing_experiment(model, args.batch_size, args.dual_update_interval, rho=0.1)
    for method in methods:
      timers = {name: pooling_timer(exp, method, pooling, args.warmup, devices)
                for name, pooling in POOLINGS.items()}
      for _ in range(args.windows):
        for timer in timers.values():
          timer.window(args.dual_update_interval)
      flax_pool, ours = timers["nn.max_pool"], timers["max_pool_2x2"]
      difference = max_difference(flax_pool.state, ours.state)
      same = "yes" if difference == 0 else f"no (max difference {difference:.2e})"
      lines.append(f"| {model} | {method} | {1e3 * flax_pool.median_step:.1f} | "
                   f"{1e3 * ours.median_step:.1f} | "
                   f"{flax_pool.median_step / ours.median_step:.2f}x | {same} |")
      print(lines[-1], flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
