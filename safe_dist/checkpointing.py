"""Asynchronous orbax checkpoints (OCDBT over tensorstore) of the train state and the data iterator."""

from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Keeps the last `keep` checkpoints of {state, data iterator} under `directory`.

  Saves return as soon as the device arrays are copied to host; writing goes on in the
  background. Every process takes part; each writes its own shards and iterator state.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, force: bool = False) -> bool:
    saved = self._manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iterator)))
    if saved:
      logging.info("checkpoint: saving step %d (asynchronously)", step)
    return saved

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None) -> Optional[Any]:
    """The newest checkpoint that restores; incomplete or corrupt ones are skipped with a
    warning. None when there is none."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint of step %d cannot be restored (%s: %s); trying an older "
                        "one", step, type(e).__name__, str(e).split("\n")[0][:300])
    return None

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores the state into `abstract_state`'s shapes and shardings (any mesh)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the target shardings: the restore target for any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
