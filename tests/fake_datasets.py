"""Small datasets in the real on-disk formats, for tests (there is no CIFAR here)."""

import os
import pickle

import numpy as np


def encoded_images(n, shape, seed=0):
  """Random uint8 images whose first two pixels encode the example index."""
  images = np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)
  flat = images.reshape(n, -1)
  flat[:, 0], flat[:, 1] = np.arange(n) % 256, np.arange(n) // 256
  return images


def write_cifar(directory, kind, sizes, seed=0):
  """CIFAR python pickles in the real format; returns {split: (HWC images, labels)}."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  num_classes, label_key = (10, b"labels") if kind == "cifar10" else (100, b"fine_labels")
  files = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
           if kind == "cifar10" else {"train": ["train"], "test": ["test"]})
  expected = {}
  for split, names in files.items():
    images, labels = [], []
    for name in names:
      chw = encoded_images(sizes[split], (3, 32, 32), seed=int(rng.integers(1 << 30)))
      label = rng.integers(0, num_classes, sizes[split])
      with open(os.path.join(directory, name), "wb") as f:
        pickle.dump({b"data": chw.reshape(len(chw), 3072), label_key: list(label),
                     b"batch_label": b"x"}, f)
      images.append(chw.transpose(0, 2, 3, 1))
      labels.append(label)
    expected[split] = np.concatenate(images), np.concatenate(labels)
  return expected
