"""Test session setup: 8 fake CPU devices, so sharding is exercised without accelerators, and a
persistent compilation cache shared by every test and every process the tests start (the
same small models are compiled many times over; compiling dominates the suite's time).

The cache lives beside the downloaded assets ($SAFE_CACHE_DIR, else ~/.cache/safe_dist), so a
machine that keeps its downloads between runs keeps its compiled programs too (emptied when
it passes 2 GiB).
Random initialisation uses non-partitionable threefry: on CPU it compiles ~4x faster, and no
test depends on which random values are drawn (JAX gives the same values on every mesh in both
modes); `test_trainer` keeps one run on the production default.
"""

import os
import shutil

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE_ROOT = os.environ.get("SAFE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "safe_dist")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE_ROOT, "jax_test_cache"))
_CACHE_LIMIT = 2 * 2**30


def _start_afresh_when_large(directory: str) -> None:
  """Empties the compilation cache when it exceeds _CACHE_LIMIT, once per session (in the
  controller, before any worker starts). JAX's own LRU eviction (a size cap) rescans the
  directory under a lock at every write and races with concurrent writers."""
  if os.environ.get("PYTEST_XDIST_WORKER") or not os.path.isdir(directory):
    return
  size = sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())
  if size > _CACHE_LIMIT:
    shutil.rmtree(directory, ignore_errors=True)


_start_afresh_when_large(os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
