"""The models, by the reference's `--model` names: LeNet300-100, LeNet5, CIFAR ResNets and
VGGs, and `llama` (a LLaMA-family decoder whose architecture a `LlamaConfig` gives;
`models.llama`).

Every vision model takes NHWC images in [0, 1], normalises them with the dataset's per-channel
mean and std, computes in `dtype` with float32 parameters and returns float32 logits.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from safe_dist.models.lenet import LeNet, LeNet5
from safe_dist.models.llama import Llama, LlamaConfig
from safe_dist.models.resnet import CifarResNet, blocks_for_depth
from safe_dist.models.vgg import VGG


def _resnet(depth: int, width: int = 16) -> Callable[..., nn.Module]:
  return functools.partial(CifarResNet, blocks_per_stage=blocks_for_depth(depth), width=width)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "LeNet300-100": functools.partial(LeNet, hidden=(300, 100)),
    "LeNet5": LeNet5,
    **{f"ResNet{d}": _resnet(d) for d in (20, 32, 44, 56)},
    **{f"ResNet{d}x2": _resnet(d, width=32) for d in (20, 32)},
    **{f"VGG{d}": functools.partial(VGG, depth=d) for d in (11, 13, 16, 19)},
    **{f"VGG{d}-bn": functools.partial(VGG, depth=d, batch_norm=True) for d in (11, 13, 16, 19)},
}
LLAMA = "llama"
VISION_MODEL_NAMES = tuple(_FACTORIES)
MODEL_NAMES = VISION_MODEL_NAMES + (LLAMA,)


def _check(name: str) -> None:
  if name not in _FACTORIES:
    raise ValueError(f"--model must be one of {MODEL_NAMES}, got {name!r}")


def create_model(name: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 dtype: Any = jnp.float32) -> nn.Module:
  """The vision model `name`; call as `model.apply(variables, images, train=...)`."""
  if name not in _FACTORIES:
    raise ValueError(f"--model must be one of {VISION_MODEL_NAMES}, got {name!r}")
  return _FACTORIES[name](num_classes=num_classes, mean=tuple(float(m) for m in mean),
                          std=tuple(float(s) for s in std), dtype=dtype)


def has_batch_norm(name: str) -> bool:
  """Whether `name` keeps `batch_stats` (the ResNets and the `-bn` VGGs)."""
  _check(name)
  return name.startswith("ResNet") or name.endswith("-bn")


def create_llama(config: LlamaConfig, dtype: Any = jnp.float32) -> Llama:
  """The decoder of `config`; call as `model.apply(variables, tokens)`."""
  return Llama(config, dtype=dtype)
