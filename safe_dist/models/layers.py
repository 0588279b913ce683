"""Conv, Dense and BatchNorm constructors whose parameters carry logical axis names.

Pruning finds weights by the leaf name `kernel` (ndim >= 2); `safe_dist.sharding` maps the
axis names below onto the mesh.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
DENSE_AXES = ("mlp_in", "mlp_out")

# Kaiming normal over fan_out: the torch CIFAR ResNet references (and safe-jax's ResNets).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
lecun_normal = nn.initializers.lecun_normal()  # flax's default
zeros = nn.initializers.zeros


def conv(features: int, kernel_size: int = 3, strides: int = 1, *, padding: Any = "SAME",
         use_bias: bool = True, dtype: Any = jnp.float32, kernel_init=kaiming_fan_out,
         name: str | None = None) -> nn.Conv:
  """A square conv; kernel (h, w, in, out) and bias (out,) are named."""
  return nn.Conv(features, (kernel_size, kernel_size), (strides, strides), padding=padding,
                 use_bias=use_bias, dtype=dtype,
                 kernel_init=nn.with_logical_partitioning(kernel_init, CONV_AXES),
                 bias_init=nn.with_logical_partitioning(zeros, ("conv_out",)), name=name)


def dense(features: int, *, dtype: Any = jnp.float32, kernel_init=lecun_normal,
          name: str | None = None) -> nn.Dense:
  """A dense layer; kernel (in, out) and bias (out,) are named."""
  return nn.Dense(features, dtype=dtype,
                  kernel_init=nn.with_logical_partitioning(kernel_init, DENSE_AXES),
                  bias_init=nn.with_logical_partitioning(zeros, ("mlp_out",)), name=name)


def batch_norm(train: bool, *, dtype: Any = jnp.float32, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm over the (global, sharded) batch; scale and bias follow the conv channels.

  No axis_name: under jit the batch is one global array, so statistics are global already.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      axis_name=None, dtype=dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                      bias_init=nn.with_logical_partitioning(zeros, ("conv_out",)), name=name)


def max_pool_2x2(x: jnp.ndarray, padding: str = "VALID") -> jnp.ndarray:
  """2x2 max pooling with stride 2 over NHWC: `nn.max_pool(x, (2, 2), (2, 2), padding)`'s values
  and gradient, ties included (a window's gradient goes to its first maximum, row-major).

  Each window's maximum is picked by an argmax over a reshape rather than by a windowed
  reduction, whose gradient (select-and-scatter) XLA:CPU computes ~9x slower: a quarter of
  LeNet-5's train step.
  """
  if padding not in ("VALID", "SAME"):
    raise ValueError(f"max_pool_2x2: padding must be 'VALID' or 'SAME', got {padding!r}")
  n, h, w, c = x.shape
  if padding == "SAME":  # an odd side gets one -inf row/column at its end, as lax pads it
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
  else:  # VALID drops an odd side's last row/column
    x = x[:, :h - h % 2, :w - w % 2]
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  windows = windows.reshape(n, h // 2, w // 2, c, 4)
  first_max = jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=jnp.bool_)
  return jnp.where(first_max, windows, 0).sum(axis=-1)


def normalize(x: jnp.ndarray, mean: Sequence[float], std: Sequence[float],
              dtype: Any) -> jnp.ndarray:
  """(x - mean) / std per channel (last axis), in float32, then cast to the compute dtype."""
  x = (x.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)
