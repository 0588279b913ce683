"""Bytes of a run's sharded train state per device, from its abstract state (nothing allocated).

The rows: parameters, the base optimizer's state (e.g. Adam's moments), the sparsifier's state
(SAFE's `a` = x + u and its packed mask, GMP/IHT masks, SAFE+'s importance sums), BatchNorm
statistics. Each leaf counts the bytes of its shard (`sharding.shard_shape`): a replicated
leaf counts in full on every device.
"""

import math

import jax
import numpy as np

from safe_dist.sparsity import ADMMState, MaskState

_SPARSIFIER_STATES = (ADMMState, MaskState)


def _bytes(tree, per_device: bool) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def _sparsifier_states(opt_state) -> list:
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _SPARSIFIER_STATES))
          if isinstance(s, _SPARSIFIER_STATES)]


def state_bytes(abstract_state, per_device: bool = True) -> dict:
  """{"params", "optimizer", "sparsifier", "batch_stats", "total"}: bytes of a TrainState of
  ShapeDtypeStructs carrying shardings (per device, or of the whole, unsharded state)."""
  sparsifier = _bytes(_sparsifier_states(abstract_state.opt_state), per_device)
  rows = {"params": _bytes(abstract_state.params, per_device),
          "optimizer": _bytes(abstract_state.opt_state, per_device) - sparsifier,
          "sparsifier": sparsifier,
          "batch_stats": _bytes(abstract_state.batch_stats, per_device)}
  rows["total"] = sum(rows.values())
  return rows


def report(abstract_state, mesh) -> str:
  """A table of the state's bytes per device on `mesh` against the whole state."""
  per_device, whole = state_bytes(abstract_state), state_bytes(abstract_state, per_device=False)
  lines = [f"train state on mesh {dict(mesh.shape)} ({mesh.size} devices)",
           f"{'':<12} {'per device':>14} {'whole state':>14}"]
  for name in per_device:
    lines.append(f"{name:<12} {per_device[name] / 2**30:>10.3f} GiB {whole[name] / 2**30:>10.3f} GiB")
  return "\n".join(lines)
