"""float64 numpy references of the projections (exact count, ties: lower position kept)."""

import numpy as np


def keep_mask_global(arrays, num_drop: int) -> list[np.ndarray]:
  """Keep-masks over all `arrays` together (scores as given), dropping the `num_drop` smallest;
  among equal scores the higher position (arrays in order, row-major) is dropped first."""
  flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
  order = np.lexsort((np.arange(flat.size), -flat))  # score desc, position asc
  keep = np.zeros(flat.size, bool)
  keep[order[:flat.size - num_drop]] = True
  out, start = [], 0
  for a in arrays:
    out.append(keep[start:start + a.size].reshape(np.shape(a)))
    start += a.size
  return out


def keep_mask_nm(a, n: int, m: int) -> np.ndarray:
  """Keep the n largest of every m consecutive entries along the input axis (-2)."""
  moved = np.moveaxis(np.asarray(a, np.float64), -2, -1)
  groups = moved.reshape(-1, m)
  keep = np.zeros(groups.shape, bool)
  for r in range(groups.shape[0]):
    keep[r, np.lexsort((np.arange(m), -groups[r]))[:n]] = True
  return np.moveaxis(keep.reshape(moved.shape), -1, -2)
