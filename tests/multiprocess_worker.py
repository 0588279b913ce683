"""One process of tests/test_distributed.py: joins the run, psums a global array, prints it."""

import os
import sys

import numpy as np


def main(coordinator: str, num_processes: int, process_id: int) -> None:
  from safe_dist import distributed
  distributed.initialize(coordinator, num_processes, process_id)
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  n_local = jax.local_device_count()
  # Process p holds rows [p * n_local, (p + 1) * n_local) of arange(global devices).
  local = np.arange(n_local, dtype=np.float32) + process_id * n_local
  x = jax.make_array_from_process_local_data(sharding, local)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  print(f"RESULT process={jax.process_index()} count={jax.process_count()} "
        f"local={n_local} global={jax.device_count()} main={distributed.is_main_process()} "
        f"any={distributed.any_process(process_id == 1)} sum={float(total)}", flush=True)
  # Both processes are past their last collective. Exit without jax.distributed's shutdown
  # barrier: on a loaded 2-core machine it hung once (process 1 waiting after process 0, the
  # coordinator, had gone); this test is about joining and collectives, not teardown (the
  # trainer tests in test_multihost.py and test_slurm.py exit the normal way).
  os._exit(0)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
