"""One pruned kernel <-> the arrays a format stores for it.

Every `decode(encode(x))` gives back `x` bit for bit (the exported kernels hold +0.0 where
pruned). Parts are plain numpy arrays, so any tool that reads `.npz` reads them:

  masked   values (the dense kernel, exact zeros), mask (bool, True where kept)
  bitmask  bits (np.packbits of the row-major keep-mask), values (the kept weights in
           row-major order), shape
  bcoo     data (nse,), indices (nse, ndim) int32, shape: the buffers of a
           `jax.experimental.sparse.BCOO` (no batch or dense dimensions, sorted, unique)
  nm       values (..., out, in / M, N): the N kept weights of each group of M consecutive
           inputs of each output; indices: their positions 0..M-1 in the group, ascending,
           packed to ceil(log2 M) bits each (2 bits for 2:4, the layout of 2:4 sparse tensor
           cores); shape. A group with fewer than N nonzeros stores zeros in its free slots.
"""

import dataclasses
import functools
import math
from typing import Callable, Optional

import numpy as np
from jax.experimental import sparse

Parts = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Codec:
  """How a format stores one pruned kernel, and reads it back."""
  encode: Callable[[np.ndarray], Parts]
  decode: Callable[[Parts], np.ndarray]


def _shape(parts: Parts) -> tuple[int, ...]:
  return tuple(int(d) for d in parts["shape"])


def _shape_part(x: np.ndarray) -> np.ndarray:
  return np.asarray(x.shape, np.int64)


def masked_encode(x: np.ndarray) -> Parts:
  return {"values": x, "mask": x != 0}


def masked_decode(parts: Parts) -> np.ndarray:
  return np.where(parts["mask"], parts["values"], np.zeros((), parts["values"].dtype))


def bitmask_encode(x: np.ndarray) -> Parts:
  mask = x != 0
  return {"bits": np.packbits(mask, axis=None), "values": x[mask], "shape": _shape_part(x)}


def bitmask_decode(parts: Parts) -> np.ndarray:
  shape = _shape(parts)
  mask = np.unpackbits(parts["bits"], count=math.prod(shape)).astype(bool).reshape(shape)
  out = np.zeros(shape, parts["values"].dtype)
  out[mask] = parts["values"]
  return out


def bcoo_encode(x: np.ndarray) -> Parts:
  indices = np.argwhere(x != 0).astype(np.int32)  # row-major: BCOO's sorted order
  return {"data": x[tuple(indices.T)], "indices": indices, "shape": _shape_part(x)}


def to_bcoo(parts: Parts) -> sparse.BCOO:
  """The stored buffers as a `BCOO` matrix (for `x @ kernel` with sparse kernels)."""
  return sparse.BCOO((parts["data"], parts["indices"]), shape=_shape(parts),
                     indices_sorted=True, unique_indices=True)


def bcoo_decode(parts: Parts) -> np.ndarray:
  """`to_bcoo(parts).todense()`, scattered on the host."""
  out = np.zeros(_shape(parts), parts["data"].dtype)
  out[tuple(parts["indices"].T)] = parts["data"]
  return out


def index_bits(m: int) -> int:
  """Bits of one index into a group of m: ceil(log2 m)."""
  return max(1, math.ceil(math.log2(m)))


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
  """Each entry (< 2**bits) as `bits` bits, most significant first, all packed into bytes."""
  shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
  return np.packbits((indices.astype(np.uint8)[..., None] >> shifts) & 1, axis=None)


def unpack_indices(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
  count = math.prod(shape)
  flat = np.unpackbits(packed, count=count * bits).reshape(count, bits)
  return (flat @ (1 << np.arange(bits - 1, -1, -1))).reshape(shape)


def _groups(x: np.ndarray, m: int) -> np.ndarray:
  """(..., in, out) -> (..., out, in / m, m): the groups of m consecutive inputs."""
  moved = np.moveaxis(x, -2, -1)
  return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def nm_encode(x: np.ndarray, n: int, m: int) -> Parts:
  if x.ndim < 2 or x.shape[-2] % m:
    raise ValueError(f"a kernel of shape {x.shape} has no groups of {m} inputs")
  groups = _groups(x, m)
  nonzero = groups != 0
  if (nonzero.sum(axis=-1) > n).any():
    raise ValueError(f"a kernel of shape {x.shape} is not {n}:{m} sparse (a group of {m} "
                     f"inputs holds more than {n} nonzeros)")
  # The nonzeros of each group first (then zeros to fill N slots), in ascending position.
  kept = np.sort(np.argsort(~nonzero, axis=-1, kind="stable")[..., :n], axis=-1)
  return {"values": np.take_along_axis(groups, kept, axis=-1),
          "indices": pack_indices(kept, index_bits(m)), "shape": _shape_part(x)}


def nm_decode(parts: Parts, n: int, m: int) -> np.ndarray:
  shape, values = _shape(parts), parts["values"]
  kept = unpack_indices(parts["indices"], index_bits(m), values.shape)
  groups = np.zeros((*values.shape[:-1], m), values.dtype)
  np.put_along_axis(groups, kept, values, axis=-1)
  moved = groups.reshape(*groups.shape[:-2], -1)  # (..., out, in)
  out = np.moveaxis(moved, -1, -2)
  assert out.shape == shape, (out.shape, shape)
  return np.ascontiguousarray(out)


def get(name: str, n_m: Optional[tuple[int, int]] = None) -> Codec:
  """The codec of format `name` (`nm` needs `n_m`)."""
  if name == "nm":
    if n_m is None:
      raise ValueError("the nm format needs the run's N:M")
    return Codec(functools.partial(nm_encode, n=n_m[0], m=n_m[1]),
                 functools.partial(nm_decode, n=n_m[0], m=n_m[1]))
  return CODECS[name]


CODECS = {"masked": Codec(masked_encode, masked_decode),
          "bitmask": Codec(bitmask_encode, bitmask_decode),
          "bcoo": Codec(bcoo_encode, bcoo_decode)}
