"""Benchmarks (run as modules, e.g. `python -m safe_dist.bench.projection`)."""

import jax


def peak_memory_line() -> str:
  """The process's peak device memory so far (largest over local devices), as one line.

  Backends without allocator statistics (CPU) say so instead of a number.
  """
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  if not peaks:
    return f"peak device memory: n/a ({jax.local_devices()[0].platform} keeps no statistics)"
  return f"peak device memory: {max(peaks) / 2**30:.2f} GiB (largest of {len(peaks)} devices)"
