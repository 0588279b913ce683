"""How long a checkpoint save blocks the train loop: asynchronous vs blocking orbax saves.

    python -m safe_dist.bench.checkpoint [--repeats 3] [--sizes lenet,vgg19,synthetic200mb]

For each state, `Checkpointer.save` of the async checkpointer (the trainer's) is timed from the
call to its return, which is all the train loop waits for (device-to-host copy and the start of
the background write), then until the write is committed; the blocking checkpointer
(`async_save=False`) is timed from the call to its return, when the checkpoint is committed.
States: the debug config's LeNet-300-100 SAFE train state, the VGG19-bn (CIFAR-10) SAFE train
state (params + momentum + SAFE's z, u and perturbation buffers) and a synthetic tree.
"""

import argparse
import statistics
import tempfile
import time

import grain
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from safe_dist import optim
from safe_dist.checkpointing import Checkpointer
from safe_dist.data import DatasetInfo
from safe_dist.experiment import ModelConfig
from safe_dist.sparsity import SparsifierConfig, make_optimizer
from safe_dist.train_state import TrainState


def train_state(model_name: str, image_shape: tuple, total_steps: int = 1000) -> TrainState:
  """The SAFE train state the trainer would build for `model_name` (its real optimizer state)."""
  channels = image_shape[-1]
  info = DatasetInfo(1, 1, 10, image_shape, (0.5,) * channels, (0.25,) * channels)
  model = ModelConfig(name=model_name).build(info, False)
  lr_fn = optim.learning_rate_schedule(optim.OptimizerConfig(), 100, total_steps)
  tx = make_optimizer(SparsifierConfig(name="safe", sparsity=0.95),
                      optim.make_base_optimizer(optim.OptimizerConfig(), lr_fn), total_steps)

  @jax.jit
  def init(key):
    variables = nn.unbox(model.init(key, jnp.zeros((1, *image_shape)), train=False))
    params = variables["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
  return init(jax.random.PRNGKey(0))


def synthetic_tree(megabytes: int, leaf_mb: int = 8) -> dict:
  n = max(megabytes // leaf_mb, 1)
  size = leaf_mb * 2**20 // 4
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  return {f"leaf_{i:03d}": jax.random.normal(k, (size,), jnp.float32) for i, k in enumerate(keys)}


STATES = {
    "lenet": lambda: train_state("LeNet300-100", (28, 28, 1)),
    "vgg19": lambda: train_state("VGG19-bn", (32, 32, 3)),
    "synthetic200mb": lambda: synthetic_tree(200),
}


def _iterator():
  it = iter(grain.MapDataset.range(10**6).to_iter_dataset())
  next(it)
  return it


def _megabytes(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def _parameters(tree) -> int:
  params = tree.params if isinstance(tree, TrainState) else tree
  return sum(x.size for x in jax.tree.leaves(params))


def time_saves(state, repeats: int, async_save: bool) -> tuple[list[float], list[float]]:
  """(seconds blocked in save(), seconds until committed) per save, after one warm-up save."""
  blocked, committed = [], []
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = Checkpointer(directory, keep=2, async_save=async_save)
    iterator = _iterator()
    for step in range(repeats + 1):
      jax.block_until_ready(state)
      start = time.perf_counter()
      checkpointer.save(step, state, iterator, force=True)
      returned = time.perf_counter()
      checkpointer.wait()
      done = time.perf_counter()
      if step:  # the first save creates the handlers and directories
        blocked.append(returned - start)
        committed.append(done - start)
    checkpointer.close()
  return blocked, committed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sizes", default=",".join(STATES))
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)  # orbax's per-save INFO and "waited for the previous"
  rows = []
  for name in args.sizes.split(","):
    state = STATES[name]()
    a_blocked, a_done = time_saves(state, args.repeats, async_save=True)
    s_blocked, _ = time_saves(state, args.repeats, async_save=False)
    rows.append((name, _parameters(state) / 1e6, _megabytes(state),
                 statistics.median(a_blocked), statistics.median(a_done),
                 statistics.median(s_blocked)))
    del state
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"checkpoint save: train loop blocked, median of {args.repeats} saves ({device})")
  header = ("state", "params (M)", "state (MB)", "async: save() (s)", "async: committed (s)",
            "sync: save() (s)", "sync / async blocked")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, params, mb, ab, ad, sb in rows:
    lines.append(f"| {name} | {params:.2f} | {mb:.0f} | {ab:.3f} | {ad:.3f} | {sb:.3f} | "
                 f"{sb / max(ab, 1e-9):.1f}x |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
