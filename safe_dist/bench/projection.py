"""Benchmark of `prune_mask` (global scope) on float32 vectors sharded over 8 devices.

  python -m safe_dist.bench.projection --min_log2 20 --max_log2 26 --repeats 5

Times (median of repeats after a warm-up, block_until_ready) of: prune_mask at sparsity 0.9;
one elementwise pass (jnp.sum(jnp.abs(x))); gather + full sort (jnp.sort of the replicated
vector); numpy.partition of the vector on the host.
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--min_log2", type=int, default=20)
  parser.add_argument("--max_log2", type=int, default=26)
  parser.add_argument("--step", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--sort_max_log2", type=int, default=24,
                      help="skip gather+sort above this size (it takes minutes)")
  args = parser.parse_args(argv)
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
