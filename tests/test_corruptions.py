"""Corrupted test sets: generated (imagecorruptions), real CIFAR-10-C layout, argument checks."""

import os

import numpy as np
import pytest

from safe_dist import corruptions

pytest.importorskip("imagecorruptions")


def _clean(n=4, shape=(32, 32, 3), seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n,) + shape, dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.filterwarnings("ignore")
def test_every_corruption_generates():
  images, _ = _clean(n=1)
  for name in corruptions.CORRUPTIONS:
    out = corruptions.generate(images, name, 2)
    assert out.shape == images.shape and out.dtype == np.uint8, name
    assert not np.array_equal(out, images), name


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "glass_blur", "frost"])
def test_generated_deterministic_with_seed(name):
  images, labels = _clean()
  got = corruptions.load_corrupted("/nonexistent", name, 3, images, labels, max_examples=3, seed=7)
  assert got.source == corruptions.GENERATED_SOURCE == "ImageNet-C style (imagecorruptions)"
  assert got.images.shape == (3, 32, 32, 3) and got.images.dtype == np.uint8
  np.testing.assert_array_equal(got.labels, labels[:3])
  assert not np.array_equal(got.images, images[:3])
  again = corruptions.load_corrupted(None, name, 3, images, labels, max_examples=3, seed=7)
  np.testing.assert_array_equal(again.images, got.images)
  # Seeded per image: the first example does not depend on how many are generated.
  one = corruptions.load_corrupted(None, name, 3, images, labels, max_examples=1, seed=7)
  np.testing.assert_array_equal(one.images[0], got.images[0])
  if name != "frost":  # frost picks one of 5 textures: seeds may agree
    other = corruptions.load_corrupted(None, name, 3, images, labels, max_examples=3, seed=8)
    assert not np.array_equal(other.images, got.images)


def test_global_numpy_state_untouched():
  images, _ = _clean(n=2)
  np.random.seed(123)
  expected = np.random.rand()
  np.random.seed(123)
  corruptions.generate(images, "gaussian_noise", 1, seed=5)
  assert np.random.rand() == expected


@pytest.mark.filterwarnings("ignore")
def test_float_and_grayscale_images():
  images, _ = _clean(n=2)
  floats = corruptions.generate(images.astype(np.float32) / 255, "shot_noise", 5)
  assert floats.dtype == np.float32 and floats.shape == images.shape
  assert 0.0 <= floats.min() and floats.max() <= 1.0
  for shape in [(28, 28), (28, 28, 1)]:  # MNIST-like: padded to 32 and back to one channel
    gray, _ = _clean(n=2, shape=shape)
    out = corruptions.generate(gray, "motion_blur", 3)
    assert out.shape == gray.shape and out.dtype == np.uint8
    assert not np.array_equal(out, gray)
  gray_float = corruptions.generate(gray.astype(np.float32) / 255, "contrast", 4)
  assert gray_float.shape == gray.shape and gray_float.dtype == np.float32


def _fake_cifar10c(folder, name, n=6):
  """5 intensities of n images: pixel value = intensity * 10 + index, label = index."""
  os.makedirs(folder, exist_ok=True)
  data = np.zeros((5 * n, 32, 32, 3), np.uint8)
  for level in range(5):
    for i in range(n):
      data[level * n + i] = (level + 1) * 10 + i
  np.save(os.path.join(folder, f"{name}.npy"), data)
  np.save(os.path.join(folder, "labels.npy"), np.tile(np.arange(n), 5).astype(np.uint8))


@pytest.mark.parametrize("subdir", ["CIFAR-10-C", ""])
def test_real_files_intensity_slice(tmp_path, subdir):
  _fake_cifar10c(os.path.join(tmp_path, subdir), "fog")
  got = corruptions.load_corrupted(str(tmp_path), "fog", 4)
  assert got.source == corruptions.CIFAR10C_SOURCE == "CIFAR-10-C"
  assert got.images.shape == (6, 32, 32, 3) and got.images.dtype == np.uint8
  np.testing.assert_array_equal(got.images[:, 0, 0, 0], 40 + np.arange(6))
  np.testing.assert_array_equal(got.labels, np.arange(6))
  few = corruptions.load_corrupted(str(tmp_path), "fog", 1, max_examples=2)
  np.testing.assert_array_equal(few.images[:, 0, 0, 0], [10, 11])
  # Float clean images: the real set comes back in the same convention.
  clean = np.zeros((6, 32, 32, 3), np.float32)
  as_float = corruptions.load_corrupted(str(tmp_path), "fog", 2, clean)
  assert as_float.images.dtype == np.float32
  np.testing.assert_allclose(as_float.images[:, 0, 0, 0], (20 + np.arange(6)) / 255)
  # Another corruption has no file there: generated from the clean images instead.
  images, labels = _clean(n=2)
  assert corruptions.load_corrupted(str(tmp_path), "brightness", 2, images,
                                    labels).source == corruptions.GENERATED_SOURCE
  with pytest.raises(ValueError, match="clean test set"):
    corruptions.load_corrupted(str(tmp_path), "fog", 2, np.zeros((2, 28, 28), np.uint8))


def test_invalid_arguments(tmp_path):
  images, labels = _clean(n=1)
  for intensity in [0, 6, 2.5, True]:
    with pytest.raises(ValueError, match="--corrupt_intensity"):
      corruptions.load_corrupted(None, "fog", intensity, images, labels)
  with pytest.raises(ValueError, match="gaussian_noise, shot_noise"):
    corruptions.load_corrupted(None, "rain", 1, images, labels)
  with pytest.raises(FileNotFoundError, match="CIFAR-10-C"):
    corruptions.load_corrupted(str(tmp_path), "fog", 1)
  with pytest.raises(ValueError, match="images must be"):
    corruptions.generate(np.zeros((1, 32, 32, 2), np.uint8), "fog", 1)


@pytest.mark.filterwarnings("ignore")
def test_generated_sets_cached(tmp_path, monkeypatch):
  images, labels = _clean(n=3, shape=(28, 28))
  cache = str(tmp_path / "cache")
  first = corruptions.load_corrupted(None, "frost", 2, images, labels, seed=3, cache_dir=cache)
  np.testing.assert_array_equal(first.images, corruptions.generate(images, "frost", 2, seed=3))
  path = corruptions.cache_path(cache, images, "frost", 2, 3)
  assert os.listdir(cache) == [os.path.basename(path)]
  # Every setting and the clean images themselves name the file.
  other_images = images.copy()
  other_images[2, 0, 0] ^= 1
  names = {corruptions.cache_path(cache, *args) for args in [
      (images, "frost", 2, 3), (images, "fog", 2, 3), (images, "frost", 1, 3),
      (images, "frost", 2, 4), (other_images, "frost", 2, 3), (images[:2], "frost", 2, 3),
      (images.astype(np.float32) / 255, "frost", 2, 3)]}
  assert len(names) == 7
  # So do the versions of the packages that generate it.
  with monkeypatch.context() as patch:
    patch.setattr(corruptions, "_version", lambda package: "0.0")
    assert corruptions.cache_path(cache, images, "frost", 2, 3) != path

  def refuse(*args, **kwargs):
    raise AssertionError("generated although cached")

  monkeypatch.setattr(corruptions, "generate", refuse)
  again = corruptions.load_corrupted(None, "frost", 2, images, labels, seed=3, cache_dir=cache)
  np.testing.assert_array_equal(again.images, first.images)
  assert again.source == corruptions.GENERATED_SOURCE
  monkeypatch.undo()
  # A broken or misshapen file is made again; a partial write never takes the file's name.
  for broken in (b"not an array", None):
    if broken is None:
      np.save(path, np.zeros((2, 28, 28), np.uint8))
    else:
      with open(path, "wb") as f:
        f.write(broken)
    remade = corruptions.generate_cached(cache, images, "frost", 2, seed=3)
    np.testing.assert_array_equal(remade, first.images)
    np.testing.assert_array_equal(np.load(path), first.images)
  assert os.listdir(cache) == [os.path.basename(path)]
  floats = images.astype(np.float32) / 255
  cached_floats = corruptions.generate_cached(cache, floats, "frost", 2, seed=3)
  assert cached_floats.dtype == np.float32
  np.testing.assert_array_equal(corruptions.generate_cached(cache, floats, "frost", 2, seed=3),
                                cached_floats)
