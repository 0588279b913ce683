"""LeNet300-100: a fully connected net over flattened images (as safe-jax's MLP)."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from safe_dist.models import layers


class LeNet(nn.Module):
  """flatten -> Dense(h) -> relu for each h in `hidden` -> Dense(num_classes)."""
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  hidden: Sequence[int] = (300, 100)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no batch statistics, no dropout
    x = layers.normalize(x, self.mean, self.std, self.dtype)
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(layers.dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
    x = layers.dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
