"""Benchmarks (run as modules, e.g. `python -m safe_dist.bench.projection`)."""
