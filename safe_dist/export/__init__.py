"""Export of a run's final network in formats to deploy (masked, bitmask, bcoo, nm, hf), their
loaders, the size table and a sparse-vs-dense inference benchmark. Command line:
`python -m safe_dist.export` (`safe_dist.export.cli`)."""
