"""grain pipelines: the infinite, shuffled, process-sharded train stream and padded eval batches.

The order of training examples depends only on the seed: each epoch is a fresh permutation of
the (first `max_examples`) training examples, cut to whole global batches (the last partial
batch of every epoch is dropped, so an epoch is num_train // global_batch_size steps). Process
i of P gets rows [i*B/P, (i+1)*B/P) of each global batch, so the global batches are the same
for any process count. CIFAR augmentation (random crop from 4-pixel zero padding, random
horizontal flip) is drawn from the seed and the global step, so it too does not depend on
the process count. MNIST-family images are never augmented.

A validation split (`validation_examples` N > 0) is N training examples held out of the train
stream: the last N of a permutation of the training split drawn with the fixed
VALIDATION_SEED, so the same examples for every run seed (and process count). Label noise is
applied to the remaining training examples only; the held-out labels stay clean.
"""

import functools
import math
from typing import Optional

import grain
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from safe_dist.data import sources

PAD = 4  # CIFAR random crop: 4-pixel zero padding
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
# The held-out validation examples are drawn with this seed, never with a run's: hyperparameters
# chosen on them by runs of several seeds were all chosen on the same examples.
VALIDATION_SEED = 0x5AFE_7A1
EVAL_SPLITS = ("train", "validation", "test")  # "train": without the held-out examples


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch size {batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  return batch_size // process_count


def _derived_seeds(seed: int, count: int) -> list:
  """Independent 32-bit seeds for the pipeline's random stages."""
  return [int(s) for s in np.random.SeedSequence([seed % 2**32, 0x5AFE]).generate_state(count)]


def apply_label_noise(labels: np.ndarray, ratio: float, num_classes: int, seed: int) -> np.ndarray:
  """Symmetric noise: round(ratio*N) examples, fixed by seed, get a uniformly drawn other class."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"label noise ratio must be in [0, 1], got {ratio}")
  labels = np.asarray(labels, np.int32)
  count = int(round(ratio * len(labels)))
  rng = np.random.default_rng([seed % 2**32, 0x401])
  flipped = rng.choice(len(labels), size=count, replace=False)
  noisy = labels.copy()
  noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=count)) % num_classes
  return noisy


def check_validation_examples(num_train: int, num_validation: int) -> None:
  if not 0 <= num_validation < num_train:
    raise ValueError(f"--validation_examples must be >= 0 and smaller than the {num_train} "
                     f"examples of the training split, got {num_validation}")


def validation_split(num_train: int, num_validation: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held out): sorted indices into a training split of `num_train` examples; the
  held-out ones are the last `num_validation` of a permutation drawn with VALIDATION_SEED."""
  check_validation_examples(num_train, num_validation)
  order = np.random.default_rng(VALIDATION_SEED).permutation(num_train)
  cut = num_train - num_validation
  return np.sort(order[:cut]), np.sort(order[cut:])


def split_arrays(name: str, split: str, data_dir: Optional[str] = None,
                 validation_examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images, int32 labels) of one of EVAL_SPLITS: "train" without the
  `validation_examples` held-out examples, "validation" those, "test" the test split."""
  if split not in EVAL_SPLITS:
    raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
  if split == "validation" and not validation_examples:
    raise ValueError("the validation split needs --validation_examples N > 0")
  if split == "test" or not validation_examples:
    return sources.load_split(name, split, data_dir)
  return _held_out_arrays(name, split, data_dir, validation_examples)


@functools.lru_cache(maxsize=4)
def _held_out_arrays(name: str, split: str, data_dir: Optional[str],
                     validation_examples: int) -> tuple[np.ndarray, np.ndarray]:
  # Copies of the rows (the train stream, BN re-calibration and every evaluation share them).
  images, labels = sources.load_split(name, "train", data_dir)
  kept, held_out = validation_split(len(labels), validation_examples)
  index = held_out if split == "validation" else kept
  images, labels = images[index], labels[index]
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Crops [B,H,W,C] images at `offsets` [B,2] of their PAD-zero-padded copies, then flips."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  windows = sliding_window_view(padded, (h, w), axis=(1, 2))  # [B, 2PAD+1, 2PAD+1, C, H, W]
  out = np.ascontiguousarray(
      windows[np.arange(b), offsets[:, 0], offsets[:, 1]].transpose(0, 2, 3, 1))
  out[flips] = out[flips, :, ::-1]
  return out


class _Gather:
  """(global step, index batch) -> {"image": float32 in [0, 1], "label": int32}.

  With `augment_seed`, the crop offsets in [0, 2*PAD] and flips of the whole global batch
  are drawn from (seed, step), and this process takes its rows: the same for any process count.
  """

  def __init__(self, images, labels, augment_seed=None, global_batch=0, process_index=0):
    self.images, self.labels, self.augment_seed = images, labels, augment_seed
    self.global_batch, self.process_index = global_batch, process_index

  def __call__(self, step: int, index: np.ndarray) -> dict:
    images = self.images[index]
    if self.augment_seed is not None:
      rng = np.random.default_rng([self.augment_seed, step])
      offsets = rng.integers(0, 2 * PAD + 1, size=(self.global_batch, 2))
      flips = rng.random(self.global_batch) < 0.5
      rows = slice(self.process_index * len(index), (self.process_index + 1) * len(index))
      images = crop_and_flip(images, offsets[rows], flips[rows])
    return {"image": images.astype(np.float32) / 255.0, "label": self.labels[index]}


def make_train_iterator(name: str, *, global_batch_size: int, seed: int,
                        data_dir: Optional[str] = None, label_noise_ratio: float = 0.0,
                        augment: bool = True, max_examples: Optional[int] = None,
                        validation_examples: int = 0, process_index: int = 0,
                        process_count: int = 1):
  """Infinite grain iterator (get_state/set_state) of this process's training batches (never
  of the `validation_examples` held-out examples)."""
  images, labels = split_arrays(name, "train", data_dir, validation_examples)
  if max_examples:
    images, labels = images[:max_examples], labels[:max_examples]
  if label_noise_ratio:
    num_classes = sources.dataset_info(name, data_dir).num_classes
    labels = apply_label_noise(labels, label_noise_ratio, num_classes, seed)
  shuffle_seed, augment_seed = _derived_seeds(seed, 2)
  ds = train_index_batches(len(labels), global_batch_size, shuffle_seed, process_index,
                           process_count)
  augment_seed = augment_seed if augment and name.startswith("cifar") else None
  ds = ds.map_with_index(_Gather(images, labels, augment_seed, global_batch_size, process_index))
  return iter(ds.to_iter_dataset(READ_OPTIONS))


def train_index_batches(num_examples: int, global_batch_size: int, shuffle_seed: int,
                        process_index: int, process_count: int) -> grain.MapDataset:
  """Infinite dataset whose element t is this process's example indices of step t.

  Each epoch is a fresh permutation of range(num_examples), cut to whole global batches.
  """
  local = _local_batch_size(global_batch_size, process_count)
  steps_per_epoch = num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{num_examples} training examples make no global batch of "
                     f"{global_batch_size}")
  ds = grain.MapDataset.range(num_examples).shuffle(seed=shuffle_seed)
  ds = ds[:steps_per_epoch * global_batch_size]  # per-epoch drop_remainder
  return ds.batch(local)[process_index::process_count].repeat()


class _EvalGather:
  """Position batch -> {"image", "label", "weight"}; positions past the split are padding.

  Integer (uint8) images are scaled to [0, 1]; float images are taken as they are."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels
    self.scale = 255.0 if np.issubdtype(images.dtype, np.integer) else 1.0

  def __call__(self, positions: np.ndarray) -> dict:
    real = positions < len(self.labels)
    index = np.where(real, positions, 0)
    mask = real.reshape((-1,) + (1,) * (self.images.ndim - 1))
    images = np.where(mask, self.images[index], 0)
    return {"image": images.astype(np.float32) / self.scale,
            "label": np.where(real, self.labels[index], 0).astype(np.int32),
            "weight": real.astype(np.float32)}


def eval_batches_of_arrays(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                           process_index: int = 0, process_count: int = 1):
  """Iterable over this process's slices of global batches covering `images` once, in order;
  the last batch is zero-padded to `batch_size` with weight 0."""
  ds = eval_position_batches(len(labels), batch_size, process_index, process_count)
  return ds.map(_EvalGather(images, labels)).to_iter_dataset(READ_OPTIONS)


def eval_position_batches(num_examples: int, batch_size: int, process_index: int,
                          process_count: int) -> grain.MapDataset:
  """This process's positions of the global batches covering range(num_examples) once, in
  order; positions >= num_examples pad the last batch."""
  local = _local_batch_size(batch_size, process_count)
  num_batches = math.ceil(num_examples / batch_size)
  ds = grain.MapDataset.range(num_batches * batch_size).batch(local)
  return ds[process_index::process_count]


def make_eval_batches(name: str, *, batch_size: int, split: str = "test",
                      data_dir: Optional[str] = None, max_examples: Optional[int] = None,
                      validation_examples: int = 0, process_index: int = 0,
                      process_count: int = 1):
  """`eval_batches_of_arrays` over the first `max_examples` (default: all) of a split of
  EVAL_SPLITS."""
  images, labels = split_arrays(name, split, data_dir, validation_examples)
  if max_examples:
    images, labels = images[:max_examples], labels[:max_examples]
  return eval_batches_of_arrays(images, labels, batch_size=batch_size,
                                process_index=process_index, process_count=process_count)
