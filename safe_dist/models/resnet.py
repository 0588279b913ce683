"""CIFAR ResNets (He et al. 2016, section 4.2) with projection shortcuts (option B)."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from safe_dist.models import layers

PAD1 = ((1, 1), (1, 1))  # torch-style padding: stride-2 convs pad both sides, unlike "SAME"


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers; a 1x1 conv-BN shortcut where the shape changes."""
  features: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s, pad, name: layers.conv(f, k, s, padding=pad, use_bias=False,
                                                  dtype=self.dtype, name=name)
    bn = lambda name: layers.batch_norm(train, dtype=self.dtype, name=name)
    y = nn.relu(bn("bn1")(conv(self.features, 3, self.strides, PAD1, "conv1")(x)))
    y = bn("bn2")(conv(self.features, 3, 1, PAD1, "conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = bn("proj_bn")(conv(self.features, 1, self.strides, "VALID", "proj_conv")(x))
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """3x3 conv stem, three stages of `blocks_per_stage` blocks (width, 2x, 4x), avg pool, head."""
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  blocks_per_stage: int = 3
  width: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.normalize(x, self.mean, self.std, self.dtype)
    x = layers.conv(self.width, 3, 1, padding=PAD1, use_bias=False, dtype=self.dtype,
                    name="conv_init")(x)
    x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn_init")(x))
    for stage in range(3):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, self.dtype,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    # safe-jax's head: N(0, 0.01) weights, zero bias.
    x = layers.dense(self.num_classes, dtype=self.dtype,
                     kernel_init=nn.initializers.normal(0.01), name="head")(x)
    return x.astype(jnp.float32)


def blocks_for_depth(depth: int) -> int:
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
  return (depth - 2) // 6
