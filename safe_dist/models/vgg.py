"""VGG for small images: five conv stages with max pooling, then a small classifier.

As in safe-jax (after flaxmodels): conv biases, lecun-normal initialisation (flax's default),
BatchNorm after every conv in the `-bn` variants, and a 512 -> 512 -> classes head (safe-jax's
dropout is left out: the trainer passes no dropout rng). Pooling uses padding "SAME", so
28x28 inputs shrink 28 -> 14 -> 7 -> 4 -> 2 -> 1 like 32x32 ones shrink to 1.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from safe_dist.models import layers

STAGE_WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3),
                   19: (2, 2, 4, 4, 4)}


class VGG(nn.Module):
  """VGG-`depth`; `batch_norm` adds BN after each conv; `hidden` are the head's hidden widths."""
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  depth: int = 19
  batch_norm: bool = False
  hidden: Sequence[int] = (512, 512)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.normalize(x, self.mean, self.std, self.dtype)
    for stage, (width, n) in enumerate(zip(STAGE_WIDTHS, CONVS_PER_STAGE[self.depth])):
      for i in range(n):
        name = f"{stage + 1}_{i + 1}"
        x = layers.conv(width, 3, 1, padding="SAME", use_bias=True, dtype=self.dtype,
                        kernel_init=layers.lecun_normal, name=f"conv{name}")(x)
        if self.batch_norm:
          x = layers.batch_norm(train, dtype=self.dtype, name=f"bn{name}")(x)
        x = nn.relu(x)
      x = layers.max_pool_2x2(x, padding="SAME")
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(layers.dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
    x = layers.dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
