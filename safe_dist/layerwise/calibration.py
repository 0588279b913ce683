"""Calibration windows: `nsamples` random windows of `seqlen` tokens, as the reference code draws
them (a uniformly random start in the calibration text for each sample), fixed by the seed."""

import numpy as np


def calibration_windows(tokens: np.ndarray, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
  """(nsamples, seqlen) int32 windows of `tokens` at seeded random starts."""
  if nsamples < 1:
    raise ValueError(f"--nsamples must be >= 1, got {nsamples}")
  if len(tokens) <= seqlen:
    raise ValueError(f"the calibration text has {len(tokens)} tokens, fewer than --seqlen "
                     f"{seqlen} + 1")
  starts = np.random.default_rng([seed % 2**32, 0xCA1]).integers(0, len(tokens) - seqlen,
                                                                   nsamples)
  return np.stack([tokens[s:s + seqlen] for s in starts]).astype(np.int32)
