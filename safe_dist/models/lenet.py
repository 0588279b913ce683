"""LeNet300-100, a fully connected net over flattened images (as safe-jax's MLP), and LeNet-5,
the small conv net of the pruning literature (Caffe's variant)."""

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


class LeNet5(nn.Module):
  """Caffe's LeNet (examples/mnist/lenet.prototxt), as pruned by Han et al. (2015) and since:
  conv 20 5x5 valid -> maxpool 2 -> conv 50 5x5 valid -> maxpool 2 -> Dense(500) -> relu ->
  Dense(num_classes), with a relu after each conv as well (Caffe's has none there).
  431,080 parameters on 28x28x1 images; all four kernels are prunable.
  """
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no batch statistics, no dropout
    x = layers.normalize(x, self.mean, self.std, self.dtype)
    for i, features in enumerate((20, 50)):
      # LeCun normal: the variance of Caffe's "xavier" filler (1 / fan_in), as the dense layers.
      x = layers.conv(features, 5, padding="VALID", dtype=self.dtype,
                      kernel_init=layers.lecun_normal, name=f"conv{i + 1}")(x)
      x = layers.max_pool_2x2(nn.relu(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(layers.dense(500, dtype=self.dtype, name="fc1")(x))
    x = layers.dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
