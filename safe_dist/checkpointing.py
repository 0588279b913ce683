"""Asynchronous orbax checkpoints (OCDBT over tensorstore) of the train state and the data
iterator.

A checkpoint of step s is the directory `<directory>/<s>` with two items: `state` (the whole
TrainState: params, optimizer and sparsifier state, step) and `data` (the grain iterator
state of every process). The experiment itself is recorded once per workdir
(`safe_dist.workdir`). Orbax writes
into `<s>.orbax-checkpoint-tmp-*` and renames on commit, so a run killed mid-save leaves a tmp
directory that is never listed as a step. A listed step that fails to restore (files deleted
or truncated) is skipped with a warning and, once an older one restored, moved aside to
`<s>.unreadable` (kept, not deleted) so that training can write step s again.
"""

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint._src.multihost import multihost

ITEMS = ("state", "data")
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointRestoreError(ValueError):
  """Checkpoints exist but none of them restores (e.g. a different model's state)."""


class Checkpointer:
  """Keeps the last `keep` checkpoints of {state, data iterator} under `directory`.

  Saves return as soon as the device arrays are copied to host (so the next, donating, train
  step may run); writing goes on in the background. Every process takes part; each writes
  its own shards and iterator state.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    directory = os.path.abspath(directory)  # orbax's OCDBT layer needs an absolute path
    self._directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, force: bool = False) -> bool:
    """Starts saving `state` and the iterator's position as `step`. False if orbax skipped it
    (a step at or after `step` exists and not `force`)."""
    saved = self._manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))
    if saved:
      logging.info("checkpoint: saving step %d (asynchronously)", step)
    return saved

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> Optional[Any]:
    """The state of the newest checkpoint that restores (the iterator is set to its position).

    Incomplete or corrupt newer ones are skipped with a warning and moved aside once an older
    one restored. None when there is no checkpoint; CheckpointRestoreError when there are
    some but none restores (nothing is moved then: the target probably does not match).
    """
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        message = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        logging.warning("checkpoint of step %d cannot be restored (%s); trying an older one",
                        step, message)
        failed.append((step, message))
        continue
      if failed:
        self._set_aside([s for s, _ in failed])
        logging.warning("resumed from step %d: the newer checkpoint(s) of step(s) %s could not "
                        "be restored and were moved aside to <step>%s in %s", step,
                        ", ".join(str(s) for s, _ in failed), UNREADABLE_SUFFIX,
                        self._directory)
      return state
    if failed:
      details = "; ".join(f"step {s}: {m}" for s, m in failed)
      raise CheckpointRestoreError(
          f"none of the checkpoints in {self._directory} can be restored ({details}); nothing "
          "was changed there")
    return None

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores the state into `abstract_state`'s shapes and shardings (any mesh)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable step directories so that orbax neither lists nor overwrites them
    and training can save those steps again; nothing is deleted."""
    if jax.process_index() == 0:
      for step in steps:
        src = self._directory / str(step)
        dst = self._directory / f"{step}{UNREADABLE_SUFFIX}"
        n = 1
        while dst.exists():
          n += 1
          dst = self._directory / f"{step}{UNREADABLE_SUFFIX}-{n}"
        if src.exists():
          src.rename(dst)
    multihost.sync_global_processes(
        f"safe_dist_checkpoint_set_aside_{'_'.join(str(s) for s in steps)}")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_last(workdir: str, abstract_state: Any, missing: str) -> tuple[int, Any]:
  """(step, state) of the latest checkpoint of the run in `workdir`, for reading it (evaluate,
  export, load); ValueError(`missing`) when the run has none."""
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise ValueError(missing)
    return step, checkpointer.restore(step, abstract_state)
  finally:
    checkpointer.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the target shardings: the restore target for any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
