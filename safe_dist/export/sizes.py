"""Bytes on disk of an export, against the same network stored dense (float32 `.npz`)."""

import os
import tempfile

from safe_dist.export import archive
from safe_dist.export.network import Network


def file_sizes(directory: str) -> dict[str, int]:
  """{path relative to `directory`: bytes} of every file under it."""
  sizes = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      sizes[os.path.relpath(path, directory)] = os.path.getsize(path)
  return dict(sorted(sizes.items()))


def dense_bytes(network: Network) -> int:
  """Bytes of the network's variables as one dense float32 `.npz` (the reference)."""
  with tempfile.TemporaryDirectory() as directory:
    return os.path.getsize(archive.save(directory, network.variables(), codec=None))


def table(directory: str, network: Network) -> str:
  """Each file of the export, the total, and the dense reference, in bytes and as a ratio."""
  dense = dense_bytes(network)
  sizes = file_sizes(directory)
  total = sum(sizes.values())
  rows = [*sizes.items(), ("total", total), ("dense float32 .npz (reference)", dense)]
  width = max(len(name) for name, _ in rows)
  lines = [f"{'file':<{width}} {'bytes':>13} {'vs dense':>9}"]
  lines += [f"{name:<{width}} {size:>13,} {size / dense:>8.3f}x" for name, size in rows]
  return "\n".join(lines)
