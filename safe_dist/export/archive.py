"""A network's variables in one uncompressed `.npz`, pruned kernels stored by a codec.

Keys are the variables' paths, `params/fc1/kernel`, `batch_stats/bn1/mean`, ...; a pruned
kernel is stored as its codec's parts under `<path>:<part>` (`params/fc1/kernel:values`,
`params/fc1/kernel:mask`); every other leaf (biases, norms, embeddings, BatchNorm
statistics) is stored dense under its path.
"""

import os
from typing import Optional

import jax
import numpy as np

from safe_dist.export.codecs import Codec
from safe_dist.sparsity import prunable_tree

NETWORK_FILE = "network.npz"


def _flatten(tree) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in flat}


def save(directory: str, variables: dict, codec: Optional[Codec]) -> str:
  """Writes `variables` ({"params": ..., "batch_stats": ...}) into `directory`, the prunable
  kernels of params through `codec` (None: dense). Returns the file's path."""
  arrays = {}
  for collection, tree in variables.items():
    prunable = _flatten(prunable_tree(tree)) if collection == "params" else {}
    for key, x in _flatten(tree).items():
      key = f"{collection}/{key}"
      if codec is not None and prunable.get(key.split("/", 1)[1]):
        arrays.update({f"{key}:{part}": a for part, a in codec.encode(x).items()})
      else:
        arrays[key] = x
  path = os.path.join(directory, NETWORK_FILE)
  np.savez(path, **arrays)
  return path


def load(directory: str, codec: Codec) -> dict:
  """The variables `save` wrote, every pruned kernel decoded by `codec`."""
  leaves: dict = {}
  with np.load(os.path.join(directory, NETWORK_FILE)) as archive:
    for name in archive.files:
      key, _, part = name.partition(":")
      if part:
        leaves.setdefault(key, {})[part] = archive[name]
      else:
        leaves[key] = archive[name]
  variables: dict = {}
  for key, value in leaves.items():
    *parents, leaf = key.split("/")
    node = variables
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = codec.decode(value) if isinstance(value, dict) else value
  return variables
