"""launch/ scripts without a cluster, the network or changes to this machine: fake commands
(apt-get, sudo, dpkg, curl, python3, srun, ...) first on PATH record how they are called.

Each test runs the scripts from a copy of launch/ in a temporary "repository", so that the
presence of `.venv` is up to the test.
"""

import os
import shutil
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every fake appends one line to $CALLS: its name as called ($0) and its arguments.
RECORD = 'echo "$0 $*" >> "$CALLS"\n'
FAKES = {
    "id": 'echo "$FAKE_UID"\n',
    # Marks what runs under it, so that the fake apt-get records "sudo apt-get ...".
    "sudo": 'FAKE_SUDO=1 exec "$@"\n',
    "apt-get": """\
echo "${FAKE_SUDO:+sudo }apt-get $*" >> "$CALLS"
case "$1" in
  update) [[ -z "${FAKE_OFFLINE:-}" ]] || exit 100; touch "$STATE/updated" ;;
  # Empty package lists, as in a fresh container, until `update` has run.
  install) [[ -f "$STATE/updated" ]] || { echo "E: Unable to locate package" >&2; exit 100; } ;;
esac
""",
    "dpkg": RECORD + '[[ -n "${FAKE_DPKG_INSTALLED:-}" ]]\n',
    "curl": RECORD + """\
[[ -z "${FAKE_OFFLINE:-}" ]] || { echo "curl: (6) Could not resolve host" >&2; exit 6; }
while [[ $# -gt 0 ]]; do [[ "$1" == -o ]] && out="$2"; shift; done
echo data > "$out"
""",
    # python3 on PATH: `-c CODE` fails where FAKE_NO_VENV says venv support is missing.
    "python3": RECORD + '[[ "$1" != -c || -z "${FAKE_NO_VENV:-}" ]]\n',
    # The interpreter the launch scripts pick, whichever it is: local.sh asks it for a port.
    "python": RECORD + '[[ "$1" != -c ]] || echo 12345\n',
    "srun": RECORD,
    "scontrol": 'echo node1\n',
}
DOWNLOADS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


def _write_script(path, body):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n" + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
  """A repository copy without .venv, fake commands on PATH, a private HOME; `run` runs a
  script of the copy and returns (process, recorded calls)."""
  repo = tmp_path / "repo"
  shutil.copytree(os.path.join(REPO, "launch"), repo / "launch")
  bin_dir = tmp_path / "bin"
  for name, body in FAKES.items():
    _write_script(str(bin_dir / name), body)
  os.remove(bin_dir / "python")  # Only python3 is on PATH, like on Debian.
  (tmp_path / "state").mkdir()
  (tmp_path / "home").mkdir()
  calls = tmp_path / "calls.txt"
  base_env = {k: v for k, v in os.environ.items()
              if not k.startswith(("SLURM_", "SAFE_", "FAKE_"))}
  base_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(tmp_path / "home"),
                  CALLS=str(calls), STATE=str(tmp_path / "state"), FAKE_UID="0")

  def run(script, *args, env=None):
    calls.write_text("")
    proc = subprocess.run(["bash", str(repo / script), *args], env={**base_env, **(env or {})},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    return proc, calls.read_text().splitlines()

  run.repo, run.bin, run.home = repo, bin_dir, tmp_path / "home"
  return run


def _add_venv(repo):
  for name in ("python", "pip"):
    _write_script(str(repo / ".venv" / "bin" / name), FAKES["python"])


# -- quickstart.sh ----------------------------------------------------------------------------


# The quickstart's last two calls: install into the repository's .venv, then train.
VENV_STEPS = [".venv/bin/pip install -q -e .[dev,eval]",
              ".venv/bin/python -m safe_dist.train --config config:fashion_mnist_lenet "
              "--workdir w"]


def _quickstart(sandbox, env=None):
  """Runs quickstart.sh with a (fake) .venv; the calls name .venv relative to the repo."""
  _add_venv(sandbox.repo)
  proc, calls = sandbox("launch/quickstart.sh", "w", env=env)
  # bash runs `.venv/bin/pip` as given but an exec'd `.venv/bin/python` by its full path.
  return proc, [c.replace(f"{sandbox.repo}/", "") for c in calls]


@pytest.mark.parametrize("user", ["root", "user without venv support"])
def test_quickstart_updates_package_lists_before_installing(sandbox, user):
  """Fresh container: empty package lists, so `apt-get update` (once, through sudo unless
  root) must come before any `apt-get install`."""
  as_root = user == "root"
  env = {} if as_root else {"FAKE_UID": "1000", "FAKE_NO_VENV": "1"}
  proc, calls = _quickstart(sandbox, env)
  assert proc.returncode == 0, proc.stderr
  sudo = "" if as_root else "sudo "
  python3 = f"{sandbox.bin}/python3 -c import ensurepip, venv"
  update = f"{sudo}apt-get update -qq"
  dpkg = f"{sandbox.bin}/dpkg -s dataset-fashion-mnist"
  data = f"{sudo}apt-get install -y -qq dataset-fashion-mnist"
  if as_root:  # venv support present: the data is the first install.
    expected = [python3, dpkg, update, data]
  else:  # The first install updates; the second one needs no update.
    expected = [python3, update, f"{sudo}apt-get install -y -qq python3-venv python3-pip",
                dpkg, data]
  assert calls == expected + VENV_STEPS


def test_quickstart_skips_apt_when_data_installed(sandbox):
  proc, calls = _quickstart(sandbox, {"FAKE_DPKG_INSTALLED": "1"})
  assert proc.returncode == 0, proc.stderr
  assert not [c for c in calls if "apt-get" in c or "curl" in c], calls
  assert calls[-2:] == VENV_STEPS


def test_quickstart_downloads_without_the_package(sandbox):
  """No Debian package to be had (other distribution lists): the download fallback."""
  _write_script(str(sandbox.bin / "apt-get"), 'echo "apt-get $*" >> "$CALLS"; exit 100\n')
  proc, calls = _quickstart(sandbox)
  assert proc.returncode == 0, proc.stderr
  cache = sandbox.home / ".cache" / "safe_dist" / "fashion_mnist"
  assert sorted(os.listdir(cache)) == sorted(f"{f}.gz" for f in DOWNLOADS)
  assert sum("curl" in c for c in calls) == 4 and calls[-2:] == VENV_STEPS, calls


def test_quickstart_offline_says_what_to_do(sandbox):
  proc, calls = _quickstart(sandbox, {"FAKE_OFFLINE": "1"})
  assert proc.returncode == 1, proc.stderr
  cache = sandbox.home / ".cache" / "safe_dist" / "fashion_mnist"
  for text in ("Offline: copy", "-ubyte.gz", str(cache), "SAFE_DATA_DIR", "rerun"):
    assert text in proc.stderr, proc.stderr
  assert not os.listdir(cache)  # No partial download left behind to pass for data.
  assert not [c for c in calls if "safe_dist.train" in c], calls


# -- which python: local.sh, train.sbatch, debug.sbatch ------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SAFE_CPU_DEVICES_PER_TASK": "1"}


@pytest.mark.parametrize("script", ["launch/local.sh", "launch/slurm/train.sbatch",
                                    "launch/slurm/debug.sbatch"])
@pytest.mark.parametrize("setup", ["no .venv", ".venv", "SAFE_PYTHON"])
def test_interpreter_choice(sandbox, tmp_path, script, setup):
  """SAFE_PYTHON wins; else the repository's .venv; else the python3 on PATH."""
  if setup != "no .venv":
    _add_venv(sandbox.repo)
  env = {}
  expected = {"no .venv": f"{sandbox.bin}/python3",
              ".venv": f"{sandbox.repo}/.venv/bin/python",
              "SAFE_PYTHON": f"{tmp_path}/elsewhere/python"}[setup]
  if setup == "SAFE_PYTHON":
    _write_script(expected, FAKES["python"])
    env["SAFE_PYTHON"] = expected
  if script.endswith(".sbatch"):
    # As under Slurm: run from the submission directory, srun (fake) gets the command line.
    env.update(SLURM_ENV, SLURM_SUBMIT_DIR=str(sandbox.repo))
    proc, calls = sandbox(script, "--workdir", "w", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c for c in calls if "srun" in c] == [
        f"{sandbox.bin}/srun {expected} -m safe_dist.train"
        + (" --debug" if "debug" in script else "") + " --workdir w"], calls
  else:
    proc, calls = sandbox(script, "1", "--workdir", str(tmp_path / "w"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert [c.split(" ")[0] for c in calls] == [expected, expected], calls
    assert calls[1].startswith(f"{expected} -m safe_dist.train --workdir"), calls
