"""safe-dist: SAFE (sparse and flat minima) pruning in JAX, sharded over a device mesh."""

__version__ = "0.1.0"
