"""Benchmark of `prune_mask` (global scope) on float32 vectors sharded over 8 devices.

  python -m safe_dist.bench.projection --min_log2 20 --max_log2 26 --repeats 5
  python -m safe_dist.bench.projection --leaves 1,4,16,64 --leaves_log2 22

Times (median of repeats after a warm-up, block_until_ready) of: prune_mask at sparsity 0.9;
one elementwise pass (jnp.sum(jnp.abs(x))); gather + full sort (jnp.sort of the replicated
vector); numpy.partition of the vector on the host.

With `--leaves`: 2^leaves_log2 weights split into that many leaves (a model's kernels), one
global prune_mask over all of them, on one device and sharded over all: seconds to compile
(set no JAX_COMPILATION_CACHE_DIR) and ms per call.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from safe_dist.bench import peak_memory_line
from safe_dist.sparsity.topk import prune_mask


def _time(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _leaf_tree(n: int, num_leaves: int, sharding) -> list:
  """`num_leaves` random score vectors of ~n / num_leaves entries (a multiple of the devices)."""
  devices = len(sharding.device_set)
  size = n // num_leaves // devices * devices
  keys = jax.random.split(jax.random.key(num_leaves), num_leaves)
  make = jax.jit(lambda key: jnp.abs(jax.random.normal(key, (size,))), out_shardings=sharding)
  return [make(key) for key in keys]


def leaves_table(counts: list[int], log2n: int, sparsity: float, repeats: int) -> None:
  """Compile seconds and ms per call of one global prune_mask over `count` leaves."""
  n = 2**log2n
  devices = jax.devices()
  meshes = {"1 device": jax.make_mesh((1,), ("d",), devices=devices[:1]),
            f"{len(devices)} devices": jax.make_mesh((len(devices),), ("d",))}
  print(f"\n2^{log2n} weights in L leaves, global prune_mask at sparsity {sparsity}")
  header = ["leaves"] + [f"{name} {what}" for name in meshes for what in ("compile s", "ms")]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for count in counts:
    row = [str(count)]
    for mesh in meshes.values():
      sharding = NamedSharding(mesh, P("d"))
      xs = _leaf_tree(n, count, sharding)
      shardings = [sharding] * count
      prune = jax.jit(lambda xs: prune_mask(xs, sparsity, shardings=shardings))
      t0 = time.perf_counter()
      compiled = prune.lower(xs).compile()
      t_compile = time.perf_counter() - t0
      total = sum(x.size for x in xs)
      kept = sum(int(m.sum()) for m in compiled(xs))
      assert kept == total - int(np.floor(sparsity * total)), "wrong count"
      row += [f"{t_compile:.2f}", f"{_time(lambda: compiled(xs), repeats) * 1e3:.2f}"]
    print("| " + " | ".join(row) + " |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--min_log2", type=int, default=20)
  parser.add_argument("--max_log2", type=int, default=26)
  parser.add_argument("--step", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--sort_max_log2", type=int, default=24,
                      help="skip gather+sort above this size (it takes minutes)")
  parser.add_argument("--leaves", default=None,
                      help="comma-separated leaf counts: the compile/run table over leaves "
                           "instead of the size table")
  parser.add_argument("--leaves_log2", type=int, default=22)
  args = parser.parse_args(argv)
  if args.leaves:
    leaves_table([int(c) for c in args.leaves.split(",")], args.leaves_log2, args.sparsity,
                 args.repeats)
    print(peak_memory_line())
    return
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("d"))
  print(f"{jax.devices()[0].platform} x {len(devices)} devices, sparsity {args.sparsity}, "
        f"median of {args.repeats}")
  header = ("log2N", "prune_mask ms", "one pass ms", "gather+sort ms", "np.partition ms",
            "prune/pass", "sort/prune", "np.part/prune")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for lg in range(args.min_log2, args.max_log2 + 1, args.step):
    n = 2**lg
    x = jax.jit(lambda key: jnp.abs(jax.random.normal(key, (n,))), out_shardings=sharding)(
        jax.random.key(lg))
    sp = args.sparsity
    prune = jax.jit(lambda x: prune_mask(x, sp, shardings=sharding))
    one_pass = jax.jit(lambda x: jnp.sum(jnp.abs(x)))
    t_prune = _time(lambda: prune(x), args.repeats)
    t_pass = _time(lambda: one_pass(x), args.repeats)
    k = int(np.floor(sp * n))
    mask = np.asarray(prune(x))
    assert int((~mask).sum()) == k, "wrong count"
    if lg <= args.sort_max_log2:
      gather_sort = jax.jit(lambda x: jnp.sort(x)[k], out_shardings=NamedSharding(mesh, P()))
      # the gather: x replicated first, then a full sort on every device
      replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
      t_sort = _time(lambda: gather_sort(replicate(x)), 1)  # minutes at 2^24: one timed run
    else:
      t_sort = float("nan")
    host = np.asarray(x)
    t0 = time.perf_counter()
    reps = max(1, min(args.repeats, 3))
    for _ in range(reps):
      np.partition(host, k)
    t_part = (time.perf_counter() - t0) / reps
    del host
    row = (lg, t_prune * 1e3, t_pass * 1e3, t_sort * 1e3, t_part * 1e3, t_prune / t_pass,
           t_sort / t_prune, t_part / t_prune)
    print("| {} | {:.2f} | {:.2f} | {:.1f} | {:.1f} | {:.1f} | {:.0f} | {:.2f} |".format(*row),
          flush=True)
  print(peak_memory_line())


if __name__ == "__main__":
  main()
