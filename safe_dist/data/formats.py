"""Readers for the on-disk formats: IDX (MNIST family, raw or .gz) and the CIFAR python pickles."""

import gzip
import os
import pickle
import struct

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def find_file(directory: str, name: str):
  """`directory/name` or `directory/name.gz`, whichever exists, else None."""
  for candidate in (name, name + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def _open(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_header(f):
  zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
  if zero != 0 or dtype_code not in _IDX_DTYPES:
    raise ValueError(f"not an IDX file (magic {zero:#x} {dtype_code:#x})")
  return dtype_code, struct.unpack(f">{ndim}I", f.read(4 * ndim))


def read_idx_shape(path: str) -> tuple:
  """The array shape in an IDX file's header, without reading the data."""
  with _open(path) as f:
    return _read_header(f)[1]


def read_idx(path: str) -> np.ndarray:
  """The whole array stored in an IDX file (raw or gzip-compressed)."""
  with _open(path) as f:
    dtype_code, shape = _read_header(f)
    data = np.frombuffer(f.read(), dtype=_IDX_DTYPES[dtype_code])
  size = int(np.prod(shape))
  if data.size < size:
    raise ValueError(f"{path}: truncated IDX file ({data.size} of {size} values)")
  return data[:size].reshape(shape).astype(np.dtype(_IDX_DTYPES[dtype_code]).newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as IDX (gzip-compressed when `path` ends with .gz); for tests."""
  array = np.asarray(array, np.uint8)
  with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
    f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
    f.write(struct.pack(f">{array.ndim}I", *array.shape))
    f.write(array.tobytes())


def read_cifar_pickles(paths: list, label_key: bytes) -> tuple:
  """(uint8 images [N,32,32,3] in HWC order, int32 labels [N]) from CIFAR python pickles."""
  images, labels = [], []
  for path in paths:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], np.uint8)
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(np.asarray(batch[label_key], np.int32))
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
