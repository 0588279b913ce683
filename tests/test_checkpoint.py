"""Checkpoints: what they hold, bit-exact resume after SIGKILL/SIGTERM, another mesh, corrupt
or incomplete checkpoints, and workdirs of other runs."""

import dataclasses
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safe_dist import run_setup
from safe_dist import trainer
from safe_dist.checkpointing import UNREADABLE_SUFFIX, Checkpointer, CheckpointRestoreError
from safe_dist.experiment import TrainConfig
from trainer_helpers import debug_experiment, replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEUE_EXIT_CODE = 85  # safe_dist.train.REQUEUE_EXIT_CODE (not imported: it defines flags)
# Monitoring that costs compile time and does not touch the train state.
_QUIET = {"train.sharpness_every_epochs": 0, "train.bnt_sample_size": 0}


def _quiet_overrides() -> dict:
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  return {k: v for k, v in _QUIET.items() if k.split(".")[1] in fields}


def _tree_equal(a, b, **allclose):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
    msg = jax.tree_util.keystr(path)
    if allclose:
      np.testing.assert_allclose(x, y, err_msg=msg, **allclose)
    else:
      np.testing.assert_array_equal(x, y, err_msg=msg)


def _committed_steps(checkpoints: str) -> list[int]:
  if not os.path.isdir(checkpoints):
    return []
  return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


# ---------------------------------------------------------------------------------------------
# The Checkpointer alone: a small state and a grain iterator.

def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _state(step: int) -> dict:
  return {"w": jax.random.normal(jax.random.PRNGKey(step), (50_000,)),
          "step": jnp.asarray(step, jnp.int32)}


def _abstract() -> dict:
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {"w": jax.ShapeDtypeStruct((50_000,), jnp.float32, sharding=dev),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=dev)}


def _save_steps(directory: str, steps) -> None:
  checkpointer = Checkpointer(directory, keep=10)
  iterator = _iterator()
  for s in steps:
    next(iterator)
    checkpointer.save(s, _state(s), iterator)
  checkpointer.close()


def test_checkpoint_holds_state_and_iterator(tmp_path):
  directory = str(tmp_path / "ck")
  _save_steps(directory, [1, 2, 3])
  checkpointer = Checkpointer(directory)
  iterator = _iterator()
  state = checkpointer.restore_latest(_abstract(), iterator)
  assert int(state["step"]) == 3
  _tree_equal(state, _state(3))
  assert next(iterator) == 3  # the position after the 3 batches taken before the save
  state = checkpointer.restore(1, _abstract())  # an older step still restores
  _tree_equal(state, _state(1))
  checkpointer.close()


def test_async_save_is_a_snapshot_despite_donating_steps(tmp_path):
  """save() returns after the device-to-host copy: the next train step may donate the state."""
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  state = {f"a{i}": jax.device_put(jnp.arange(2**20, dtype=jnp.float32) + i, spec)
           for i in range(4)}
  expected = jax.device_get(state)
  step = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 + 1, s), donate_argnums=0,
                 out_shardings=spec)
  checkpointer = Checkpointer(str(tmp_path / "ck"))
  checkpointer.save(1, state, _iterator())
  for _ in range(3):
    state = step(state)
  checkpointer.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec), state)
  _tree_equal(checkpointer.restore(1, abstract), expected)
  checkpointer.close()


def _truncate_data_files(step_dir: str) -> None:
  for f in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "delete_data_item"])
def test_corrupt_latest_is_skipped_kept_and_rewritable(tmp_path, damage, caplog):
  directory = str(tmp_path / "ck")
  _save_steps(directory, [1, 2, 3])
  step_dir = os.path.join(directory, "3")
  if damage == "truncate":
    _truncate_data_files(step_dir)
  elif damage == "delete_manifest":
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  else:
    shutil.rmtree(os.path.join(step_dir, "data"))
  # A save that a kill interrupted: never listed, never touched.
  tmp_dir = os.path.join(directory, "4.orbax-checkpoint-tmp-1700000000000000")
  os.makedirs(os.path.join(tmp_dir, "state"))
  checkpointer = Checkpointer(directory, keep=10)
  assert checkpointer.all_steps() == [1, 2, 3]
  iterator = _iterator()
  state = checkpointer.restore_latest(_abstract(), iterator)
  assert int(state["step"]) == 2
  _tree_equal(state, _state(2))
  assert next(iterator) == 2
  assert any("step 3 cannot be restored" in r.getMessage() for r in caplog.records)
  # Moved aside, not deleted; the tmp directory is left alone.
  assert os.path.isdir(os.path.join(directory, "3" + UNREADABLE_SUFFIX))
  assert os.path.isdir(tmp_dir)
  assert checkpointer.all_steps() == [1, 2]
  # Training from step 2 can write step 3 again (orbax refuses existing or older steps).
  assert checkpointer.save(3, _state(3), iterator)
  checkpointer.wait()
  assert checkpointer.all_steps() == [1, 2, 3]
  _tree_equal(checkpointer.restore(3, _abstract()), _state(3))
  checkpointer.close()
  # A fresh manager lists the same steps despite the extra directories.
  assert Checkpointer(directory).all_steps() == [1, 2, 3]


def test_no_restorable_checkpoint_raises_and_moves_nothing(tmp_path):
  directory = str(tmp_path / "ck")
  _save_steps(directory, [1, 2])
  before = sorted(os.walk(directory))
  wrong = {"w": jax.ShapeDtypeStruct((7,), jnp.float32), "step": _abstract()["step"],
           "extra": _abstract()["step"]}
  with pytest.raises(CheckpointRestoreError, match="none of the checkpoints"):
    Checkpointer(directory).restore_latest(wrong)
  assert sorted(os.walk(directory)) == before


def test_only_incomplete_saves_mean_a_fresh_start(tmp_path):
  directory = tmp_path / "ck"
  os.makedirs(directory / "5.orbax-checkpoint-tmp-1700000000000000" / "state")
  checkpointer = Checkpointer(str(directory))
  assert checkpointer.all_steps() == [] and checkpointer.latest_step() is None
  assert checkpointer.restore_latest(_abstract()) is None
  checkpointer.close()
  assert os.path.isdir(directory / "5.orbax-checkpoint-tmp-1700000000000000")


# ---------------------------------------------------------------------------------------------
# The trainer: another mesh, a corrupt latest checkpoint, another experiment.

class _StopAfter:
  def __init__(self, calls: int):
    self.calls, self.left = calls, calls

  def __call__(self) -> bool:
    self.left -= 1
    return self.left <= 0


def _final_state(exp, workdir, step):
  run = run_setup.setup(exp)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  state = checkpointer.restore(step, run.abstract_state)
  checkpointer.close()
  return state


@pytest.fixture(scope="module")
def eight_device_runs(tmp_path_factory, cli_background):
  """An uninterrupted 8-device run and one stopped after 10 of its 24 steps."""
  del cli_background  # started first, to run alongside
  exp = debug_experiment(**_quiet_overrides())
  full = str(tmp_path_factory.mktemp("full"))
  trainer.train_and_evaluate(exp, full)
  stopped = str(tmp_path_factory.mktemp("stopped"))
  out = trainer.train_and_evaluate(exp, stopped, stop_requested=_StopAfter(10))
  assert out == {"interrupted_at_step": 10}
  assert _committed_steps(os.path.join(stopped, "checkpoints")) == [8, 10]
  return exp, full, stopped


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, num_devices=4),
                                  pytest.param(dict(data=1, num_devices=1),
                                               marks=pytest.mark.slow)],
                         ids=["4dev_fsdp", "1dev"])
def test_resume_on_another_mesh(eight_device_runs, tmp_path, mesh):
  exp, full, stopped = eight_device_runs
  workdir = str(tmp_path / "resumed")
  shutil.copytree(stopped, workdir)
  other = replace(exp, "mesh", **mesh)
  summary = trainer.train_and_evaluate(other, workdir)
  assert summary["steps"] == 24
  expected = _final_state(exp, full, 24)
  got = _final_state(exp, workdir, 24)
  assert int(got.step) == 24
  # Other meshes sum in another order: equal up to float rounding, not bitwise.
  _tree_equal(got.params, expected.params, rtol=1e-4, atol=1e-5)
  _tree_equal(got.opt_state, expected.opt_state, rtol=1e-4, atol=1e-5)


def test_corrupt_latest_checkpoint_falls_back_and_resume_is_exact(eight_device_runs, tmp_path,
                                                                  caplog):
  exp, full, stopped = eight_device_runs
  workdir = str(tmp_path / "resumed")
  shutil.copytree(stopped, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  _truncate_data_files(os.path.join(checkpoints, "10"))
  os.makedirs(os.path.join(checkpoints, "12.orbax-checkpoint-tmp-1700000000000000", "state"))
  summary = trainer.train_and_evaluate(exp, workdir)
  assert summary["steps"] == 24
  assert any("step 10 cannot be restored" in r.getMessage() for r in caplog.records)
  assert os.path.isdir(os.path.join(checkpoints, "10" + UNREADABLE_SUFFIX))
  assert 24 in _committed_steps(checkpoints)
  _tree_equal(_final_state(exp, workdir, 24), _final_state(exp, full, 24))


@pytest.mark.parametrize("section,fields", [("model", {"name": "ResNet20"}),
                                            ("sparsifier", {"name": "gmp"}),
                                            ("train", {"max_steps": 30})])
def test_workdir_of_another_run_is_refused_untouched(eight_device_runs, section, fields):
  exp, _, stopped = eight_device_runs
  before = sorted(os.walk(stopped))
  with pytest.raises(ValueError, match="holds a different run"):
    trainer.train_and_evaluate(replace(exp, section, **fields), stopped)
  assert sorted(os.walk(stopped)) == before


# ---------------------------------------------------------------------------------------------
# The command line, killed: SIGKILL at a random point, SIGTERM (preemption).

_MAX_STEPS = 60


def _command(workdir: str) -> list[str]:
  sets = {"train.max_steps": _MAX_STEPS, "train.checkpoint_every_steps": 5,
          **_quiet_overrides()}
  cmd = [sys.executable, "-m", "safe_dist.train", "--config", "config:debug"]
  for k, v in sets.items():
    cmd += ["--config", f"set:{k}={v}"]
  return cmd + ["--workdir", workdir]


def _env(cache_dir: str) -> dict:
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _run_to_end(workdir: str, cache_dir: str) -> None:
  proc = subprocess.run(_command(workdir), env=_env(cache_dir), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _committed_steps(os.path.join(workdir, "checkpoints"))[-1] == _MAX_STEPS


def _start_and_wait_for_a_checkpoint(workdir: str, cache_dir: str) -> subprocess.Popen:
  log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "w")
  proc = subprocess.Popen(_command(workdir), env=_env(cache_dir), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not _committed_steps(os.path.join(workdir, "checkpoints")):
    assert proc.poll() is None, f"exited with {proc.returncode} before its first checkpoint"
    assert time.time() < deadline, "no checkpoint within 240 s"
    time.sleep(0.01)
  return proc


def _cli_exp():
  return debug_experiment(**{"train.max_steps": _MAX_STEPS, "train.checkpoint_every_steps": 5,
                             **_quiet_overrides()})


@pytest.fixture(scope="module")
def cli_background(tmp_path_factory):
  """Starts the uninterrupted command-line run in the background (the other core compiles
  while the in-process runs of this module go on); `cli_runs` waits for it."""
  root = tmp_path_factory.mktemp("cli")
  cache_dir = str(root / "jax_cache")
  workdir = str(root / "uninterrupted")
  proc = subprocess.Popen(_command(workdir), env=_env(cache_dir), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  yield root, cache_dir, workdir, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def cli_runs(cli_background):
  """The compilation cache shared by the subprocesses, and an uninterrupted run's state."""
  root, cache_dir, workdir, proc = cli_background
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-3000:]
  assert _committed_steps(os.path.join(workdir, "checkpoints"))[-1] == _MAX_STEPS
  return root, cache_dir, _final_state(_cli_exp(), workdir, _MAX_STEPS)


def test_sigkill_at_a_random_point_then_resume_is_bit_exact(cli_runs):
  root, cache_dir, expected = cli_runs
  workdir = str(root / "killed")
  delay = random.Random().uniform(0.0, 0.3)
  proc = _start_and_wait_for_a_checkpoint(workdir, cache_dir)
  time.sleep(delay)
  assert proc.poll() is None, "the run ended before the kill"
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  checkpoints = os.path.join(workdir, "checkpoints")
  killed_at = _committed_steps(checkpoints)[-1]
  print(f"SIGKILL {delay:.3f} s after the first checkpoint; latest committed step {killed_at}; "
        f"left: {sorted(os.listdir(checkpoints))}")
  _run_to_end(workdir, cache_dir)
  got = _final_state(_cli_exp(), workdir, _MAX_STEPS)
  _tree_equal(got.params, expected.params)
  _tree_equal(got.opt_state, expected.opt_state)
  _tree_equal(got, expected)


def test_sigterm_checkpoints_exits_85_and_resume_is_bit_exact(cli_runs):
  root, cache_dir, expected = cli_runs
  workdir = str(root / "preempted")
  proc = _start_and_wait_for_a_checkpoint(workdir, cache_dir)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE
  with open(workdir + ".log") as f:
    log = f.read()
  stopped_at = int(re.search(r"stopped by signal \S+ at step (\d+)", log).group(1))
  checkpoints = os.path.join(workdir, "checkpoints")
  assert _committed_steps(checkpoints)[-1] == stopped_at < _MAX_STEPS
  assert not [n for n in os.listdir(checkpoints) if "tmp" in n]  # committed, nothing pending
  _run_to_end(workdir, cache_dir)
  _tree_equal(_final_state(_cli_exp(), workdir, _MAX_STEPS), expected)
