"""Corrupted test sets: the real CIFAR-10-C files when present, else generated on the fly.

Real files: `<data_dir>/CIFAR-10-C/<corruption>.npy` plus `labels.npy` (or both directly in
`data_dir`); each holds the 10000 test images at intensities 1..5 in order (50000 rows).

Otherwise the clean images are corrupted with the `imagecorruptions` package (the
ImageNet-C code of Hendrycks & Dietterich). Its constants were tuned for ImageNet, so these
are "ImageNet-C style" corruptions, not CIFAR-10-C. It needs images of at least 32x32 with 3
channels: smaller images (MNIST, 28x28) are edge-padded to 32, grayscale is replicated to
RGB, and the result is cropped back and averaged to one channel again. Generation runs in
Python per image (slow: glass_blur takes ~70 ms a 32x32 image on one CPU core, all 19
together ~130 ms); use `max_examples`, and a `cache_dir` to generate a set once for every
network evaluated on it.
"""

import hashlib
import importlib.metadata
import os
import types
from typing import NamedTuple, Optional

from absl import logging
import numpy as np

# imagecorruptions.get_corruption_names("all"): 15 benchmark + 4 validation corruptions.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression", "speckle_noise", "gaussian_blur",
    "spatter", "saturate",
)
CIFAR10C_SOURCE = "CIFAR-10-C"
GENERATED_SOURCE = "ImageNet-C style (imagecorruptions)"
MIN_SIZE = 32  # imagecorruptions refuses smaller images
_IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)  # imagecorruptions.corruptions.impulse_noise


class CorruptedSet(NamedTuple):
  images: np.ndarray  # same convention as the clean images (uint8, or float32 in [0, 1])
  labels: Optional[np.ndarray]
  source: str  # CIFAR10C_SOURCE or GENERATED_SOURCE


def validate(corruption: str, intensity: int) -> None:
  if corruption not in CORRUPTIONS:
    raise ValueError(f"--corruptions: unknown {corruption!r}; allowed: {', '.join(CORRUPTIONS)}")
  if isinstance(intensity, bool) or int(intensity) != intensity or not 1 <= intensity <= 5:
    raise ValueError(f"--corrupt_intensity must be an integer in 1..5, got {intensity!r}")


def find_cifar10c(data_dir: Optional[str], corruption: str) -> Optional[str]:
  """The folder holding `<corruption>.npy` and `labels.npy`, or None."""
  if not data_dir:
    return None
  for folder in (os.path.join(data_dir, "CIFAR-10-C"), data_dir):
    if all(os.path.isfile(os.path.join(folder, f)) for f in (f"{corruption}.npy", "labels.npy")):
      return folder
  return None


def load_corrupted(data_dir: Optional[str], corruption: str, intensity: int,
                   images: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                   max_examples: Optional[int] = None, seed: int = 0,
                   cache_dir: Optional[str] = None) -> CorruptedSet:
  """The test set under `corruption` at `intensity` (1..5), from CIFAR-10-C or generated.

  images: clean (N, H, W[, C]) uint8 in [0, 255] or floats in [0, 1]; the output follows the
    same convention (float inputs give float32). Required when no CIFAR-10-C files exist.
  max_examples: keep only the first n examples (either path).
  seed: generation is deterministic given the seed (per image, so independent of n).
  cache_dir: where generated sets are kept and looked up (see `generate_cached`).
  """
  validate(corruption, intensity)
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples must be >= 1, got {max_examples}")
  folder = find_cifar10c(data_dir, corruption)
  if folder is not None:
    return _load_cifar10c(folder, corruption, intensity, images, max_examples)
  if images is None:
    raise FileNotFoundError(
        f"no CIFAR-10-C files for {corruption!r} under {data_dir!r} (expected "
        f"CIFAR-10-C/{corruption}.npy and labels.npy) and no clean images to corrupt")
  images = np.asarray(images)[:max_examples]
  labels = None if labels is None else np.asarray(labels)[:max_examples]
  generated = (generate(images, corruption, intensity, seed) if not cache_dir
               else generate_cached(cache_dir, images, corruption, intensity, seed))
  return CorruptedSet(generated, labels, GENERATED_SOURCE)


def cache_path(cache_dir: str, images: np.ndarray, corruption: str, intensity: int,
               seed: int) -> str:
  """The file of `generate(images, corruption, intensity, seed)` in cache_dir: named by the
  settings and a digest of the clean images and of the generating packages' versions, so a
  changed test set or an upgraded package never reads a stale file."""
  images = np.ascontiguousarray(images)
  versions = [_version(name) for name in ("imagecorruptions", "scikit-image", "numpy")]
  digest = hashlib.sha256(f"{images.dtype.str}{images.shape}{versions}".encode())
  digest.update(images.tobytes())
  return os.path.join(cache_dir, f"{corruption}-i{intensity}-s{seed}-{digest.hexdigest()[:24]}.npy")


def generate_cached(cache_dir: str, images: np.ndarray, corruption: str, intensity: int,
                    seed: int = 0) -> np.ndarray:
  """`generate`, read from cache_dir when an earlier call wrote it, else generated and written
  there (atomically: concurrent evaluations may share the folder). An unreadable or misshapen
  file is generated again and replaced; it holds nothing that cannot be remade."""
  validate(corruption, intensity)
  images = np.asarray(images)
  path = cache_path(cache_dir, images, corruption, intensity, seed)
  if os.path.exists(path):
    try:
      cached = np.load(path)
      if cached.shape == images.shape and cached.dtype == generate_dtype(images):
        return cached
      logging.warning("%s holds %s %s, expected %s %s: generating again", path, cached.shape,
                      cached.dtype, images.shape, generate_dtype(images))
    except (OSError, ValueError) as err:
      logging.warning("%s is unreadable (%s): generating again", path, err)
  out = generate(images, corruption, intensity, seed)
  os.makedirs(cache_dir, exist_ok=True)
  partial = f"{path}.{os.getpid()}.partial"
  with open(partial, "wb") as f:
    np.save(f, out)
  os.replace(partial, path)
  return out


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "absent"


def generate_dtype(images: np.ndarray) -> np.dtype:
  """The dtype `generate` returns for these clean images."""
  return np.dtype(np.float32) if np.issubdtype(images.dtype, np.floating) else images.dtype


def _load_cifar10c(folder, corruption, intensity, images, max_examples) -> CorruptedSet:
  data = np.load(os.path.join(folder, f"{corruption}.npy"), mmap_mode="r")
  all_labels = np.load(os.path.join(folder, "labels.npy"), mmap_mode="r")
  if len(data) % 5 or len(all_labels) != len(data):
    raise ValueError(f"{folder}: {corruption}.npy has {len(data)} rows and labels.npy "
                     f"{len(all_labels)}; expected equal counts, 5 intensities of n each")
  n = len(data) // 5
  stop = n if max_examples is None else min(n, max_examples)
  rows = slice((intensity - 1) * n, (intensity - 1) * n + stop)
  out, out_labels = np.array(data[rows]), np.array(all_labels[rows])
  if images is not None:
    images = np.asarray(images)
    if images.shape[1:] != out.shape[1:]:
      raise ValueError(f"{folder}: CIFAR-10-C images are {out.shape[1:]}, the clean test set's "
                       f"are {images.shape[1:]}; is this the right dataset?")
    if np.issubdtype(images.dtype, np.floating):
      out = out.astype(np.float32) / 255.0
  return CorruptedSet(out, out_labels, CIFAR10C_SOURCE)


def _to_uint8(images):
  if np.issubdtype(images.dtype, np.floating):
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  return images.astype(np.uint8)


class _NumpyCompat(types.ModuleType):
  """numpy with the `np.float_` alias that NumPy 2 removed (imagecorruptions' fog uses it)."""

  float_ = np.float64

  def __getattr__(self, name):
    return getattr(np, name)


def _imagecorruptions():
  """The package, patched in its own namespace only for NumPy 2 (`np.float_`) and
  scikit-image >= 0.19 (`multichannel=` became `channel_axis=`); imagecorruptions 1.1.2
  predates both."""
  import imagecorruptions  # pylint: disable=import-outside-toplevel
  from imagecorruptions import corruptions as impl  # pylint: disable=import-outside-toplevel
  if not hasattr(np, "float_") and not isinstance(impl.np, _NumpyCompat):
    impl.np = _NumpyCompat("numpy")
  if not getattr(impl.gaussian, "_safe_dist_compat", False):
    skimage_gaussian = impl.gaussian

    def gaussian(image, *args, multichannel=None, **kwargs):
      if multichannel:
        kwargs.setdefault("channel_axis", -1)
      return skimage_gaussian(image, *args, **kwargs)

    gaussian._safe_dist_compat = True
    impl.gaussian = gaussian
  return imagecorruptions


def _corrupt_one(image, corruption, intensity, seed, index):
  """One HWC uint8 RGB image (>= 32x32), seeded per image."""
  corrupt = _imagecorruptions().corrupt
  if corruption == "impulse_noise":  # skimage's random_noise ignores np.random: pass an rng
    from skimage.util import random_noise  # pylint: disable=import-outside-toplevel
    noisy = random_noise(image / 255.0, mode="s&p", amount=_IMPULSE_AMOUNT[intensity - 1],
                         rng=np.random.default_rng([seed, index]))
    return np.uint8(np.clip(noisy, 0, 1) * 255)
  np.random.seed([seed, index])
  return corrupt(image, severity=intensity, corruption_name=corruption)


def generate(images: np.ndarray, corruption: str, intensity: int, seed: int = 0) -> np.ndarray:
  """`imagecorruptions` applied to each of images (N, H, W[, C]); see the module docstring."""
  validate(corruption, intensity)
  images = np.asarray(images)
  if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
    raise ValueError(f"images must be (N, H, W) or (N, H, W, 1|3), got {images.shape}")
  as_uint8 = _to_uint8(images)
  gray = images.ndim == 3 or images.shape[-1] == 1
  rgb = as_uint8.reshape(as_uint8.shape[:3] + (-1,))
  if gray:
    rgb = np.repeat(rgb, 3, axis=-1)
  h, w = rgb.shape[1:3]
  pad_h, pad_w = max(0, MIN_SIZE - h), max(0, MIN_SIZE - w)
  pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
  state = np.random.get_state()
  try:
    out = [_corrupt_one(np.pad(img, pads, mode="edge"), corruption, intensity, seed, i)
           [pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w] for i, img in enumerate(rgb)]
    out = np.stack(out) if out else rgb.copy()
  finally:
    np.random.set_state(state)
  if gray:
    out = np.round(out.astype(np.float32).mean(-1)).astype(np.uint8).reshape(images.shape)
  if np.issubdtype(images.dtype, np.floating):
    return out.astype(np.float32) / 255.0
  return out.astype(images.dtype)
