"""TensorBoard logging (tensorboardX), written by process 0 only."""

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  """Scalars and text to TensorBoard event files in `logdir`; a no-op on other processes."""

  def __init__(self, logdir: str):
    self._writer = SummaryWriter(logdir) if jax.process_index() == 0 else None

  def scalars(self, step: int, values: dict) -> None:
    if self._writer is None:
      return
    for tag, value in values.items():
      self._writer.add_scalar(tag, float(np.asarray(value)), global_step=int(step))

  def histogram(self, step: int, tag: str, values) -> None:
    if self._writer is not None:
      self._writer.add_histogram(tag, np.asarray(values), global_step=int(step))

  def text(self, step: int, tag: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, text, global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
